# The files in this folder are transformers' own test mixins, vendored (see each file's header). They are imported
# by tests/test_transformers_common.py; pytest must not collect them on their own (several hold transformers'
# self-tests that download Hub checkpoints).
collect_ignore_glob = ["*.py", "*/*.py"]

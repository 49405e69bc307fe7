# Copyright 2019 HuggingFace Inc.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#
# Vendored for modeling_seq2seq's test suite from huggingface/transformers `tests/utils/test_configuration_utils.py`
# (transformers 5.x, `PreTrainedConfig` era). Only `config_common_kwargs` is kept: it is the one name
# `test_configuration_common.ConfigTester` imports. The rest of the upstream file tests transformers' own configs
# against Hub repositories (BertConfig, Sam3Config, ... push/pull) and is not about the model under test.

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}

"""What the shipped decoding code cannot find out for itself: which CPU it runs on (remote code opens no file).

Importing the package sets `decoding_seq2seq.FEW_ROWS_ON_MKL` and `PADDED_ROWS` from here.
"""

import torch

from .decoding_seq2seq import PADDED_ROWS as AMD_PADDED_ROWS  # the shipped default, before the package sets its own


def cpu_vendor() -> str:
    """The CPU's vendor as Linux names it ("GenuineIntel", "AuthenticAMD"), or "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def few_rows_settings(vendor: str) -> tuple[int, int]:
    """`decoding_seq2seq`'s (FEW_ROWS_ON_MKL, PADDED_ROWS) for this vendor's CPUs: up to 2 rows by MKL and no padding
    on Intel's, where MKL runs AVX-512 code, in a torch built with MKL; else oneDNN for every row count, fewer than
    6 rows padded to 6 (the shipped file's own settings; see there)."""
    return (2, 0) if vendor == "GenuineIntel" and torch.backends.mkl.is_available() else (0, AMD_PADDED_ROWS)

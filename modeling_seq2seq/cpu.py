"""What the shipped model and decoding files cannot find out for themselves: which CPU they run on (remote code opens
no file). Importing the package applies `use_mkl_where_it_is_fast` on CPUs where `mkl_runs_avx512`.
"""

import torch

from . import decoding_seq2seq, modeling_seq2seq


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


def mkl_runs_avx512(vendor: str) -> bool:
    """Whether MKL, behind `F.linear`, runs its AVX-512 code on this vendor's CPUs: on Intel's, in a torch built with
    MKL. Elsewhere (AMD) it runs slower code, and the shipped files' defaults, which use oneDNN, apply."""
    return vendor == "GenuineIntel" and torch.backends.mkl.is_available()


def use_mkl_where_it_is_fast() -> None:
    """The shipped files' settings for a CPU where MKL runs its AVX-512 code: products stay with `F.linear`
    (`modeling_seq2seq.ONEDNN_PRODUCTS`), and a decode step multiplies up to 2 rows with it and pads none
    (`decoding_seq2seq.FEW_ROWS_ON_MKL`, `PADDED_ROWS`); those say why."""
    modeling_seq2seq.ONEDNN_PRODUCTS = False
    decoding_seq2seq.FEW_ROWS_ON_MKL, decoding_seq2seq.PADDED_ROWS = 2, 0

"""The `triton` backend: each op's registered wrapper from its module in ddpm_fast.kernels' op
wrappers (ddpm_fast/ops/triton_*.py). Imported only when the backend is asked for."""
from .triton_attention import attention  # noqa: F401
from .triton_group_norm import group_norm_act  # noqa: F401
from .triton_sampling_update import sampling_update  # noqa: F401

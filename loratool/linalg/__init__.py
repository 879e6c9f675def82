"""Every decomposition the tool runs (randomized, exact, factored), the √S split into LoRA factors,
norms of factored products, and rank selection: used by extract, resize, mix, convert and inspect."""

from loratool.linalg.clamp import clamp_factors, quantile
from loratool.linalg.exact import exact_svd, thin_svd, top_singular
from loratool.linalg.factored import (
    factored_svd,
    fold_core,
    product_norm,
    product_sq_norm,
    stack_factors,
    tail_energy,
)
from loratool.linalg.randomized import randomized_svd
from loratool.linalg.rank import RankMode, numerical_rank, parse_rank_mode, select_rank
from loratool.linalg.split import split_coefficient, split_singular
from loratool.linalg.truncated import SvdPolicy, Truncation, decompose

__all__ = [
    "RankMode", "SvdPolicy", "Truncation", "clamp_factors", "decompose", "exact_svd", "factored_svd", "fold_core",
    "numerical_rank", "parse_rank_mode", "product_norm", "product_sq_norm", "quantile", "randomized_svd",
    "select_rank", "split_coefficient", "split_singular", "stack_factors", "tail_energy", "thin_svd", "top_singular",
]

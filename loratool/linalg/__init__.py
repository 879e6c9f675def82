"""Decompositions and rank selection (randomized, exact, factored) used by extract, resize and mix."""

from loratool.linalg.clamp import clamp_factors, quantile
from loratool.linalg.exact import exact_svd
from loratool.linalg.randomized import randomized_svd
from loratool.linalg.rank import RankMode, parse_rank_mode, select_rank
from loratool.linalg.truncated import SvdPolicy, Truncation, decompose

__all__ = [
    "RankMode", "SvdPolicy", "Truncation", "clamp_factors", "decompose", "exact_svd", "parse_rank_mode",
    "quantile", "randomized_svd", "select_rank",
]

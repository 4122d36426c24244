"""The analyses' name for hybrid_gpt.stats (means, intervals, paired ratios, judgements), which lives at the
start of the flow so that the benchmark (infer/) can use it too."""

from hybrid_gpt.stats import (  # noqa: F401
    format_ci,
    format_ratio,
    judge_difference,
    judge_pair,
    mean_ci,
    ratio_ci,
    seeds_needed,
    t_quantile,
)

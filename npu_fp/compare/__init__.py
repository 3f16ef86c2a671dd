"""Lineage comparison: profile scores (screening), weight-level tests (evidence), verdicts.

Entry points: `npu_fp.compare.job.compare(cfg)` (the `npu-fp compare` command) and
`npu_fp.compare.job.compare_models(ctx, cfg, models, signatures, out_dir)` (collective, for callers
that already hold a distributed context, such as the demo job).
"""

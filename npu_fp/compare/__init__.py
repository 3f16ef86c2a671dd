"""Lineage comparison: profile scores (screening), weight-level tests (evidence), verdicts.

Entry point: `npu_fp.compare.job.compare_models(ctx, cfg, models, signatures, out_dir, fingerprint)`
(collective); the `npu-fp compare` and `demo` commands (npu_fp.commands) call it and write its
document with npu_fp.report.
"""

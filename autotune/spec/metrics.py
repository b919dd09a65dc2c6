"""Names of the latency metrics a user may rank or plot by (result keys of `autotune predict`)."""

LATENCY_METRICS = ("tpot_p99_s", "ttft_p99_s", "e2e_p99_s", "tpot_p50_s", "ttft_p50_s", "e2e_p50_s", "itl_p99_s")

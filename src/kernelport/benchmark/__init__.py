"""Latency microbenchmarks against a served model: the requesters (one way each of sending a request),
the measuring loop, and the charts. Used by `kernelport bench` and by the scripts in `bench/`."""

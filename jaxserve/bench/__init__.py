"""The benchmarks, one module each (its absl flags and `main(argv)`), run as `jaxserve bench NAME`:
throughput (offline, against the device's physical floor), serve (a trace replayed against an
OpenAI-compatible endpoint), schedule (policies on the engine and in the simulator) and device
(decode, prefill and swap speed on one GPU). `launch/bench_NAME.py` runs the same from a checkout.
"""

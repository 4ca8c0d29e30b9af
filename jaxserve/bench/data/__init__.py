"""Workload samples shipped with the package (sources and licenses in README.md here)."""
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
# the first 400 requests of the Azure LLM inference trace 2023, conversation service (CC-BY-4.0)
SAMPLE_TRACE = os.path.join(_HERE, "azure_conv_sample.csv")
# SpotServe's availability traces (Apache-2.0): the paper's segments A_S and B_S, and the whole g4dn trace
SPOT_TRACES = {name: os.path.join(_HERE, f"spotserve_{name}") for name in
               ("trace_AS.jsonl", "trace_BS.jsonl", "g4dn_full.csv")}

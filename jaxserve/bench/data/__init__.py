"""Workload samples shipped with the package (sources and licenses in README.md here)."""
import os

# the first 400 requests of the Azure LLM inference trace 2023, conversation service (CC-BY-4.0)
SAMPLE_TRACE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "azure_conv_sample.csv")

"""SpotServe's evaluation setting for the spot simulator: GPT-20B on g4dn.12xlarge nodes (4 x T4).

Step times are the per-layer profile SpotServe measured with FasterTransformer on T4s
(Hsword/SpotServe, elastic-switch/profile/T4-4x/megatron_h6144_profile.json: milliseconds per
layer, prefill of a 512-token prompt ("init") and one decode step ("incr"), by tensor-parallel
degree and batch size). Workload and limits as in the artifact's 20B run (scripts_ae/aws_e2e.sh):
0.35 req/s Gamma arrivals (see `workload` on their spread), 512-token prompts, 128 output tokens, batches of at most
4, replicas of at least 12 GPUs, tensor parallelism up to 8, a required throughput of 0.4 req/s.
Link, checkpoint and restart figures are this project's assumptions (docs/benchmarks.md).
"""
from ml_collections import config_dict


def get_config():
    c = config_dict.ConfigDict()
    c.profile = dict(
        num_layers=44, pp_init_comm=7.0, pp_incr_comm=0.1, fix_factor=1.1,
        # priced as the artifact's planner prices pipelined batches (micro-batches; the embedding
        # twice a batch, ms by log2 of the batch), which matches its baselines (docs/benchmarks.md)
        micro_batches=True, embed=[0.33, 0.402, 0.614, 1.104],
        init={1: {1: 107.203, 2: 224.025, 4: 454.014, 8: 912.695},
              2: {1: 54.478, 2: 115.698, 4: 244.748, 8: 509.399},
              4: {1: 37.562, 2: 64.61, 4: 132.855, 8: 275.512},
              8: {1: 32.2, 2: 42.778, 4: 80.624, 8: 165.775}},
        incr={1: {1: 7.144, 2: 7.259, 4: 7.949, 8: 9.919},
              2: {1: 3.808, 2: 3.759, 4: 4.076, 8: 4.702},
              4: {1: 1.968, 2: 1.938, 4: 2.13, 8: 2.484},
              8: {1: 1.758, 2: 1.764, 4: 1.932, 8: 2.149}})
    # GPT-20B: 44 layers of hidden 6144 (12 h^2 weights each) plus a 51,200 x 6144 embedding, fp16
    c.param_bytes = 2 * (44 * 12 * 6144 ** 2 + 51200 * 6144)
    c.kv_bytes_per_token = 2 * 44 * 6144 * 2
    c.num_kv_heads = 48
    c.devices_per_node = 4
    c.device_bytes = 16e9
    c.link_bytes_s = 50e9 / 8
    c.checkpoint_bytes_s = 1e9      # per node, from local disk
    c.restart_s = 10.0              # process start, communicator setup, warm-up
    c.max_batch = 4
    c.max_model = 8
    c.max_pipe = 8
    c.min_replica_devices = 12
    c.required_rps = 0.4
    # The artifact's arrival file for this run (trace/query/query_tpt0.35_cv6.txt) is named CV 6 but
    # its gaps are near-regular: mean 2.87 s, CV 0.03 over its first rows. Its gaps, not its name,
    # produced the published figures, so those are what is replayed; cv=6 is a flag away.
    c.workload = dict(rate=0.35, cv=0.03, num_requests=1024, prompt_len=512, output_len=128, seed=0,
                      # The Azure conversation trace (prompts capped at 1536, outputs at 512) at a rate
                      # the cluster sustains: batch by batch, a batch lasts as long as its longest
                      # output, and at 0.21 req/s (the paper's token rate) queues grew without bound.
                      azure_rate=0.12)
    return c

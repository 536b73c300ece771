"""The DeepSpeed config keys zray reads and knowingly ignores, each with the reason.

This is the one list of them: `zray.config.fields.check_keys` consults it for every section, so
an ignored key is accepted wherever it sits, and a typo of it still gets a did-you-mean.
"""

from __future__ import annotations

# DeepSpeed keys zray accepts and knowingly does nothing with: dotted key path -> why. A key here
# that is present with a value that turns something on is warned about once per process. Keys
# that are absent, falsy, "auto" or an {"enabled": false} section stay silent.
IGNORED_KEYS: dict[str, str] = {
    # Monitoring and profiling: zray has its own metrics.
    "tensorboard": "use zray's Prometheus metrics",
    "wandb": "use zray's Prometheus metrics",
    "csv_monitor": "use zray's Prometheus metrics",
    "comet": "use zray's Prometheus metrics",
    "comms_logger": "use zray's Prometheus metrics (communication metrics)",
    "timers": "use zray's Prometheus metrics",
    "memory_breakdown": "use zray's Prometheus metrics (memory gauges)",
    "dump_state": "not implemented by zray",
    # Features zray does not implement (some are planned, see DESIGN.md).
    "amp": "Apex AMP is not supported; use fp16 or bf16",
    "compression_training": "not implemented by zray",
    "data_efficiency": "not implemented by zray",
    "curriculum_learning": "not implemented by zray",
    "aio": "NVMe offload is not supported by zray, so async I/O settings have no effect",
    "autotuning": "zray's autotuner is a later feature with its own settings",
    "pipeline": "pipeline parallelism is a later zray feature",
    "checkpoint": "zray checkpoints are always resharded at load; see zray.checkpoint_dir",
    "sparse_gradients": "not implemented by zray",
    "sparse_attention": "not implemented by zray",
    "zero_allow_untested_optimizer": "zray builds its own optimizers",
    "zero_force_ds_cpu_optimizer": "zray always uses its own CPU Adam for CPU offload",
    "disable_allgather": "not implemented by zray",
    "dataloader_drop_last": "zray's sampler decides batch boundaries",
    "eigenvalue": "not implemented by zray",
    "progressive_layer_drop": "not implemented by zray",
    "graph_harvesting": "not implemented by zray",
    "seq_parallel_comm_data_type": "sequence parallelism is not implemented by zray",
    "vocabulary_size": "not used by zray",
    "quantize_training": "not implemented by zray",
    "weight_quantization": "not implemented by zray",
    "nebula": "zray has its own checkpoint format",
    "compile": "not implemented by zray",
    "hybrid_engine": "not implemented by zray",
    "torch_autocast": "use fp16 or bf16 (zray casts the model itself)",
    "use_data_before_expert_parallelism": "mixture-of-experts is not implemented by zray",
    "optimizer.legacy_fusion": "zray has no legacy fused optimizer",
    "fp16.fused_mode": "zray has one fp16 path",
    "fp16.fp16_master_weights_and_grads": "zray keeps fp32 master weights",
    "bf16.immediate_grad_update": "zray has one bf16 path",
    "bf16.bf16_master_weights_and_grads": "zray keeps fp32 master weights",
    "bf16.bf16_optimizer_states": "zray keeps fp32 optimizer states",
    "zero_optimization.ignore_unused_parameters": "zray never fails on unused parameters",
    "zero_optimization.load_from_fp32_weights": "zray always restores fp32 master weights",
    "zero_optimization.elastic_checkpoint": "zray checkpoints are always resharded at load",
    "zero_optimization.legacy_stage1": "zray has one stage-1 implementation",
    "zero_optimization.use_multi_rank_bucket_allreduce": "not implemented by zray",
    "zero_optimization.zero_hpz_partition_size": "ZeRO++ hierarchical partitioning is not implemented",
    "zero_optimization.zero_quantized_weights": "ZeRO++ quantized weights are not implemented",
    "zero_optimization.zero_quantized_nontrainable_weights": "not implemented by zray",
    "zero_optimization.zero_quantized_gradients": "ZeRO++ quantized gradients are not implemented",
    "zero_optimization.zeropp_loco_param": "ZeRO++ is not implemented by zray",
    "zero_optimization.mics_shard_size": "MiCS is not implemented by zray",
    "zero_optimization.mics_hierarchical_params_gather": "MiCS is not implemented by zray",
    "zero_optimization.memory_efficient_linear": "zray has no special stage-3 linear layer",
    "zero_optimization.pipeline_loading_checkpoint": "not implemented by zray",
    "zero_optimization.override_module_apply": "not implemented by zray",
    "zero_optimization.log_trace_cache_warnings": "zray has no stage-3 trace cache",
    "zero_optimization.enable_sanity_checks": "not implemented by zray",
    "zero_optimization.stage3_model_persistence_threshold": "not implemented by zray",
    "zero_optimization.stage3_module_granularity_threshold": "not implemented by zray",
    "zero_optimization.stage3_use_all_reduce_for_fetch_params": "not implemented by zray",
    "zero_optimization.stage3_allgather_sequential": "not implemented by zray",
    "zero_optimization.stage3_partition_stream_chunk_size": "not implemented by zray",
    "zero_optimization.save_muon_momentum_buffer_in_memory": "zray has no Muon optimizer",
    "zero_optimization.leaf_module": "not implemented by zray",
    "zero_optimization.zenflow": "not implemented by zray",
    "zero_optimization.offload_optimizer.super_offload": "not implemented by zray",
    "zero_optimization.offload_optimizer.cpuadam_cores_perc": "zray's CPU Adam sizes its threads",
    "zero_optimization.offload_optimizer.convert_grad_on_cpu": "not implemented by zray",
    "activation_checkpointing.partition_activations": "not implemented; see activation_checkpointing.modules",
    "activation_checkpointing.cpu_checkpointing": "not implemented; see activation_checkpointing.modules",
    "activation_checkpointing.contiguous_memory_optimization": "not implemented by zray",
    "activation_checkpointing.number_checkpoints": "not implemented by zray",
    "activation_checkpointing.synchronize_checkpoint_boundary": "not implemented by zray",
    "activation_checkpointing.profile": "not implemented by zray",
    "tensor_parallel.tp_overlap_comm": "not implemented by zray",
    "tensor_parallel.tp_grain_size": "not implemented by zray",
    "tensor_parallel.partition_config": "zray's tensor slicing plan is a later feature",
    "tensor_parallel.preset_model": "zray's tensor slicing plan is a later feature",
    "tensor_parallel.keep_module_on_host": "not implemented by zray",
    "tensor_parallel.replace_with_kernel_inject": "inference kernels are not part of zray",
}

# DeepSpeed keys zray reads and checks but decides itself: dotted key path -> what zray does
# instead. Set to a value other than DeepSpeed's default, each is warned about once per process:
# the value changes nothing in zray. (A key that changes numerics or memory in DeepSpeed belongs
# here only until zray implements it.)
DECIDED_KEYS: dict[str, str] = {
    "zero_optimization.overlap_comm": (
        "zray reduces gradients during backward at stages 2-3 and at the step at stages 0-1"
    ),
    "zero_optimization.contiguous_gradients": "zray's gradients always live in flat buffers",
    "zero_optimization.allgather_partitions": "zray all-gathers flat partitions",
    "zero_optimization.allgather_bucket_size": (
        "zray all-gathers whole units: buckets of reduce_bucket_size at stages 1-2, modules at 3"
    ),
    "zero_optimization.round_robin_gradients": "zray gives each rank one contiguous shard",
    "zero_optimization.sub_group_size": "zray steps each unit's shard as one tensor",
    "zero_optimization.stage3_max_reuse_distance": (
        "zray frees each gathered unit after use; stage3_prefetch_bucket_size and "
        "stage3_max_live_parameters bound the prefetch"
    ),
    "zero_optimization.offload_optimizer.ratio": "zray offloads all of the optimizer state",
    "zero_optimization.offload_optimizer.buffer_count": "zray sizes its offload buffers itself",
    "zero_optimization.offload_optimizer.pipeline_read": "zray has no NVMe tier to pipeline",
    "zero_optimization.offload_optimizer.pipeline_write": "zray has no NVMe tier to pipeline",
    "zero_optimization.offload_optimizer.fast_init": "zray has no NVMe tier",
    "zero_optimization.offload_optimizer.nvme_path": "zray has no NVMe tier",
    "zero_optimization.offload_param.nvme_path": "zray has no NVMe tier",
    "zero_optimization.offload_param.buffer_count": "zray sizes its offload buffers itself",
    "zero_optimization.offload_param.buffer_size": "zray sizes its offload buffers itself",
    "zero_optimization.offload_param.max_in_cpu": "zray keeps every offloaded parameter on the host",
    "elasticity.min_time": "zray resizes whenever capacity changes (zray.scale_interval_s)",
    "flops_profiler.top_modules": "zray's table lists every module",
    "flops_profiler.detailed": "zray's table has one level of detail",
}

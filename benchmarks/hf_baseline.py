# The shared Hugging Face baseline protocol file, copied verbatim below this header so that the device
# machine (which gets only this repository) can run it; benchmarks/run.py calls it in a subprocess.
# Do not edit below: change the shared protocol file and copy it again.
"""Baseline: what a user would pick instead of fm9g -- Hugging Face transformers (+PEFT) on one GPU.

Each workload may carry flags after colons: `nockpt` (LoRA without activation checkpointing) and
`liger` (Liger kernels applied to the Qwen2 model first: fused linear + cross-entropy, RMSNorm,
SwiGLU, RoPE -- what LLaMA-Factory's enable_liger_kernel does), e.g. `full:liger lora:nockpt:liger`.
Liger patches the transformers modules for the rest of the process: run the liger configurations
in a process of their own, or list them after the plain ones.

Measures tokens/s, MFU (torchtitan formula: 6*N_nonembed + 12*L*H*dh*S per token, peak 989 TFLOP/s)
and peak memory for two workloads with one packed 4096-token row per step:
  full  -- full fine-tune of a 1.5B FM9G-shaped model (bf16 autocast, fp32 master, fused AdamW)
  lora  -- LoRA (r=64, alpha=32, all 7 projections) on the FM9G-7B shape (Qwen2 arch, MHA, qkv bias), bf16 base,
           gradient checkpointing on.
"""
import json, sys, time, torch
from transformers import Qwen2Config, Qwen2ForCausalLM

PEAK = 989e12
SEQ = 4096

def shape(name):
    if name == "full":
        return dict(vocab_size=73448, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                    num_attention_heads=16, num_key_value_heads=16)
    return dict(vocab_size=73448, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=28)

def flops_per_token(cfg, n_params, n_embed):
    dh = cfg.hidden_size // cfg.num_attention_heads
    return 6 * (n_params - n_embed) + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * dh * SEQ

def run(kind, steps=8, warmup=3, ckpt=True, liger=False):
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2
        apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True,
                                    cross_entropy=False)
    torch.manual_seed(0)
    cfg = Qwen2Config(**shape(kind), rope_theta=1e6, tie_word_embeddings=False, max_position_embeddings=32768)
    cfg._attn_implementation = "sdpa"
    dev = "cuda"
    if kind == "full":
        model = Qwen2ForCausalLM(cfg).to(dev)  # fp32 master weights
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        ctx = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        from peft import LoraConfig, get_peft_model
        model = Qwen2ForCausalLM(cfg).to(dev, dtype=torch.bfloat16)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=32, lora_dropout=0.0,
                   target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
        import contextlib; ctx = contextlib.nullcontext
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = cfg.vocab_size * cfg.hidden_size
    fpt = flops_per_token(cfg, n_params, n_embed)
    # packed row: 4 documents of 1024 tokens, position ids restart per document (HF packing-with-FA2 style)
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ), device=dev)
    pos = torch.arange(1024, device=dev).repeat(4)[None]
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize(); t = time.perf_counter()
        with ctx():
            out = model(input_ids=ids, position_ids=pos, labels=ids)
        out.loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(); times.append(time.perf_counter() - t)
    dt = sorted(times[warmup:])[len(times[warmup:]) // 2]
    tps = SEQ / dt
    return dict(kind=kind + ("" if ckpt else "-nockpt") + ("-liger" if liger else ""), params_B=round(n_params / 1e9, 3), tokens_per_s=round(tps),
                mfu=round(tps * fpt / PEAK, 4), peak_mem_GB=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                step_s=round(dt, 4), loss=round(out.loss.item(), 3))

if __name__ == "__main__":
    res = []
    for k in sys.argv[1:] or ["full", "lora"]:
        kind, *flags = k.split(":")
        try:
            r = run(kind, ckpt="nockpt" not in flags, liger="liger" in flags)
        except torch.cuda.OutOfMemoryError as e:
            r = dict(kind=k, error="out of memory")
        print(json.dumps(r), flush=True); res.append(r)
        torch.cuda.empty_cache()

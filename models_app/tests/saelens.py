"""SAELens as the judge of an exported folder: it trains a few steps from it (cached activations,
offline: its model and text dataset are stand-ins it never reads activations from)."""

from __future__ import annotations

from pathlib import Path

import datasets
import torch


def saelens_train(folder: Path, site: str, *, d_in: int, context_size: int, work: Path):
    """Train a small standard SAE from `folder` at `site`; return the trained SAE (its parameters
    moved from their initial values, checked here). Needs >= 32 sequences in the folder."""
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tl_model = HookedTransformer(HookedTransformerConfig(
        n_layers=2, d_model=d_in, n_ctx=context_size, d_head=16, n_heads=d_in // 16, d_vocab=384,
        act_fn="gelu",
    ))  # fmt: skip
    tokens = datasets.Dataset.from_dict({"tokens": [[1] * context_size] * 4})
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=d_in, d_sae=2 * d_in),
        model_name="stand-in", hook_name=site, dataset_path="", context_size=context_size,
        use_cached_activations=True, cached_activations_path=str(folder),
        training_tokens=640, train_batch_size_tokens=64, store_batch_size_prompts=4,
        n_batches_in_buffer=8, device="cpu", dtype="float32", n_eval_batches=0,
        n_checkpoints=0, save_final_checkpoint=False, output_path=str(work / "run"),
        checkpoint_path=str(work / "ckpt"), lr=1e-3, logger=LoggingConfig(log_to_wandb=False),
    )  # fmt: skip
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=tokens, override_model=tl_model)
    assert runner.activations_store.cached_activation_dataset is not None
    before = [p.detach().clone() for p in runner.sae.parameters()]
    sae = runner.run()
    assert any(
        not torch.equal(a, b.detach()) for a, b in zip(before, sae.parameters(), strict=True)
    )
    return sae

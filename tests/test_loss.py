"""The trainer's loss paths give the same loss and gradients: TRL's fused LM head, the model's own loss, and
sft-ray's LM head on the trained positions only (the CPU default)."""

import pytest
import torch


@pytest.fixture(scope="module")
def trainer_and_batch(tiny_model_dir, smol_tok, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from sft_ray.data import pad_collate
    from sft_ray.worker import Counter, RayDataSFTTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = SFTConfig(output_dir=str(tmp_path_factory.mktemp("loss")), use_cpu=True, bf16=False, report_to="none",
                     dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, max_length=None)
    sample = Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[1, 2]]})
    trainer = RayDataSFTTrainer(model=model, args=args, processing_class=smol_tok, train_dataset=sample,
                                ray_train=[], ray_eval=None, counter=Counter())
    assert trainer._keeps_logits  # Llama's forward takes logits_to_keep
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, len(smol_tok), (n,), generator=g).tolist() for n in (9, 17, 12)]
    # the trained parts differ per row (prompt lengths 4, 9 and 2), as in real batches
    labels = [[-100] * p + r[p:] for p, r in zip((4, 9, 2), rows)]
    batch = pad_collate({"input_ids": rows, "labels": labels}, smol_tok.pad_token_id)
    return trainer, batch


PATHS = {"fused": (True, True), "model": (False, False), "trained_positions": (False, True)}


def _loss_and_grads(trainer, batch, path, num_items):
    trainer._fused_lm_head, trainer._keeps_logits = PATHS[path]
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters()], trainer.loss_is_scaled_for_ga


@pytest.mark.parametrize("num_items", [None, 40])  # 40: a token count across accumulation steps
def test_loss_paths_agree(trainer_and_batch, num_items):
    trainer, batch = trainer_and_batch
    ref, g_ref, _ = _loss_and_grads(trainer, batch, "model", num_items)
    for path in ("fused", "trained_positions"):
        loss, grads, scaled = _loss_and_grads(trainer, batch, path, num_items)
        assert torch.allclose(loss, ref, atol=1e-5), (path, loss, ref)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, g_ref)), path
        if path == "trained_positions":  # normalised over the whole step when the Trainer gives the count
            assert scaled is (num_items is not None)
    if num_items:  # every path divides the summed token losses by the count given for the whole accumulated step
        trained = int((batch["labels"][:, 1:] != -100).sum())
        for path in PATHS:
            own = _loss_and_grads(trainer, batch, path, None)[0]
            assert torch.allclose(own * trained, _loss_and_grads(trainer, batch, path, num_items)[0] * num_items,
                                  atol=1e-4)


def test_trained_positions_loss_computes_fewer_logits(trainer_and_batch):
    """The point of the path: the LM head runs only where a trained token is predicted."""
    trainer, batch = trainer_and_batch
    seen = []
    head = trainer.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        _loss_and_grads(trainer, batch, "trained_positions", None)
        _loss_and_grads(trainer, batch, "model", None)
    finally:
        hook.remove()
    width = batch["input_ids"].shape[1]
    keep = int((batch["labels"][:, 1:] != -100).any(dim=0).sum())
    assert seen[0][1] == keep < width and seen[1][1] == width

"""The trainer's two loss paths (TRL's fused LM head, the model's own loss) give the same loss and gradients."""

import pytest
import torch


@pytest.fixture(scope="module")
def trainer_and_batch(tiny_model_dir, smol_tok, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from sft_ray.data import pad_collate
    from sft_ray.train import _make_trainer_class

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = SFTConfig(output_dir=str(tmp_path_factory.mktemp("loss")), use_cpu=True, bf16=False, report_to="none",
                     dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, max_length=None)
    sample = Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[1, 2]]})
    trainer = _make_trainer_class()(model=model, args=args, processing_class=smol_tok, train_dataset=sample,
                                    ray_train=[], ray_eval=None)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, len(smol_tok), (n,), generator=g).tolist() for n in (9, 17, 12)]
    batch = pad_collate({"input_ids": rows, "labels": [[-100] * 4 + r[4:] for r in rows]}, smol_tok.pad_token_id)
    return trainer, batch


def _loss_and_grads(trainer, batch, fused, num_items):
    trainer._fused_lm_head = fused
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize("num_items", [None, 40])  # 40: a token count across accumulation steps
def test_fused_and_model_loss_agree(trainer_and_batch, num_items):
    trainer, batch = trainer_and_batch
    fused, g_fused = _loss_and_grads(trainer, batch, True, num_items)
    plain, g_plain = _loss_and_grads(trainer, batch, False, num_items)
    assert torch.allclose(fused, plain, atol=1e-5), (fused, plain)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_fused, g_plain))
    if num_items:  # both divide the summed token losses by the count given for the whole accumulated step
        trained = int((batch["labels"][:, 1:] != -100).sum())
        for f in (True, False):
            own = _loss_and_grads(trainer, batch, f, None)[0]
            assert torch.allclose(own * trained, _loss_and_grads(trainer, batch, f, num_items)[0] * num_items,
                                  atol=1e-4)

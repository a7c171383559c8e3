"""`fm9g chat`: answers from a training checkpoint without a conversion (issue 28 item 5)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fm9g.cli import main
from fm9g.commands.chat import answer, load_trained, prompt_format
from fm9g.data.indexed import build_index
from fm9g.models.config import FM9GConfig
from fm9g.models.fm9g import FM9GModel
from fm9g.training.config import TrainConfig
from fm9g.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def test_chat_answers_from_the_quickstart_run(tmp_path, capsys):
    """The quickstart fine-tunes SmolLM2-135M on the Atlantis facts (8 steps here); `fm9g chat` on
    its run folder answers from the checkpoint, through the run's chat format, on CPU."""
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "8", "--work",
                          str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "checkpoints" / "quickstart"
    assert main(["chat", str(run), "--prompt", "What is the capital of Atlantis?", "--max-new-tokens", "24",
                 "--device", "cpu"]) == 0
    assert "Poseidonia" in capsys.readouterr().out


def _tiny_run(tmp_path: Path) -> tuple[Trainer, Path]:
    """A LoRA run on a saved tiny base (chatml data, a character vocabulary), with keep_best."""
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"] + list("abcdefghijklmnopqrstuvwxyz \n?.")
    tokens += [f"[{i}]" for i in range(99 - len(tokens))]  # every id of the tiny model's 99 decodes
    (tmp_path / "vocab.txt").write_text("".join(json.dumps(t) + "\n" for t in tokens))
    raw = tmp_path / "chat.jsonl"
    raw.write_text("".join(json.dumps({"input": f"what is {w}?", "output": f"{w} is {w[::-1]}"}) + "\n"
                           for w in ("abc", "dog", "sun", "moon", "tree", "sea", "cat", "hill", "rain", "sky")))
    build_index(raw, tmp_path / "index", language="en", overwrite=True)
    torch.manual_seed(0)
    mc = FM9GConfig.from_name("tiny")
    (tmp_path / "base").mkdir()
    torch.save(FM9GModel(mc).state_dict(), tmp_path / "base" / "base.pt")
    mc.to_json(tmp_path / "base" / "config.json")
    data = [{"dataset_name": "chat", "task_name": "chat", "path": str(tmp_path / "index"), "abs_weight": 1.0,
             "transforms": "chatml"}]
    cfg = TrainConfig(model=mc, pretrained_model=str(tmp_path / "base" / "base.pt"), tokenizer_path=str(tmp_path / "vocab.txt"),
                      data=data, lora={"r": 4, "alpha": 8}, train_iters=4, lr=1e-2, warmup_iters=0, save=str(tmp_path / "ck"),
                      save_iters=0, max_length=96, batch_size=2, progress_bar=False, inspect_iters=0, tensorboard=None,
                      stats_dir=None, eval_split=0.2, eval_iters=2, keep_best=True, eval_prompts=["what is sun?"])
    t = Trainer(cfg)
    t.fit()
    return t, cfg.run_dir


def test_chat_loads_a_lora_run_on_its_base_and_the_best_pointer(tmp_path, capsys, monkeypatch):
    trainer, run = _tiny_run(tmp_path)
    fmt = prompt_format(trainer.config, trainer.tokenizer)
    assert fmt.kind == "transform:chatml"
    assert fmt.stop_ids == [2, 4]  # </s> and <|im_end|>
    expected = answer(trainer.model.eval(), fmt, "what is dog?", max_new_tokens=12)
    loaded, cfg = load_trained(run / "latest")
    ids = torch.tensor([fmt.ids("what is dog?")])
    with torch.no_grad():  # the LoRA checkpoint on its base is the trained model
        assert torch.equal(loaded(ids).logits, trainer.model(ids).logits)
    capsys.readouterr()
    assert main(["chat", str(run / "latest"), "--prompt", "what is dog?", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == expected
    # `best` is the checkpoint of the lowest eval loss; its model is the LoRA tensors saved there on the base
    best = trainer.evaluator.best_step
    model, _ = load_trained(run / "best")
    direct, _ = load_trained(run / str(best))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), direct.state_dict().values()))
    # questions from stdin, one answer per line
    monkeypatch.setattr(sys, "stdin", io.StringIO("what is dog?\nwhat is sun?\n"))
    assert main(["chat", str(run), "--max-new-tokens", "12"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0] == expected
    # the eval_prompts answers were logged with every evaluation
    assert all("what is sun?" in e.answers for e in trainer.evaluator.history)


def test_chat_errors_say_what_to_do(tmp_path):
    from fm9g.cli import main as cli

    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        load_trained(tmp_path / "nothing")
    assert cli(["chat", str(tmp_path / "nothing"), "--prompt", "x"]) == 2

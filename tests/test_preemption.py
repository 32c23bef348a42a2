"""A preempted stage is not a finished one: the trainer exits with EXIT_PREEMPTED, skips its final
evaluation, and the pipeline stops without DONE so that the rerun resumes the stage."""

import argparse
import os
import signal
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from viscoin_jax.cli import run as pipeline
from viscoin_jax.trainers import classifier, stylegan2, toy, viscoin
from viscoin_jax.training.checkpoint import Checkpointer
from viscoin_jax.training.loop import EXIT_PREEMPTED, Preempted, TrainResult
from toy_run import TOY, run_args

RUN = run_args()

pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")


class SigtermAt(toy.ToyTask):
    """The toy task whose iterator sends this process SIGTERM after yielding batch `at`."""

    at = 3

    def make_train_iterator(self, data_state):
        inner = super().make_train_iterator(data_state)
        at = self.at

        class Iterator:
            def __next__(self):
                batch = next(inner)
                if inner.index == at:
                    os.kill(os.getpid(), signal.SIGTERM)
                return batch

            def get_state(self):
                return inner.get_state()
        return Iterator()


def _pipeline_config_file(tmp_path) -> Path:
    path = tmp_path / "pipe.py"
    path.write_text(
        "from ml_collections import ConfigDict\n"
        "from viscoin_jax.training.config import load_config\n"
        "def get_config(arg=None):\n"
        f"    stage = load_config({TOY!r}, {RUN!r})\n"
        "    return ConfigDict({'stage_order': ('toy', 'toy2'), 'stages': {'toy': stage, "
        "'toy2': stage}, 'explain': {'enabled': False}})\n")
    return path


def test_preempted_stage_gets_no_done_and_the_rerun_resumes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VISCOIN_DISTRIBUTED", "0")
    monkeypatch.setattr(toy, "make_task", SigtermAt)
    args = argparse.Namespace(config=str(_pipeline_config_file(tmp_path)), workdir=str(tmp_path / "w"),
                              unknown=[])
    assert pipeline.main(args) == EXIT_PREEMPTED
    assert "preempted at step 3 of 6" in capsys.readouterr().err
    stage = tmp_path / "w" / "toy"
    assert not (stage / pipeline.DONE).exists()
    assert not (tmp_path / "w" / "toy2").exists()  # the next stage did not start
    assert Checkpointer(stage / "checkpoints", read_only=True).all_steps() == [2, 3]

    monkeypatch.setattr(toy, "make_task", toy.ToyTask)
    assert pipeline.main(args) == 0
    assert (stage / pipeline.DONE).is_file() and (tmp_path / "w" / "toy2" / pipeline.DONE).is_file()
    assert Checkpointer(stage / "checkpoints", read_only=True).latest_step() == 6


@pytest.mark.parametrize("module, final_eval", [(classifier, "full_evaluation"),
                                                (stylegan2, "compute_fid"),
                                                (viscoin, "final_evaluation")])
def test_trainers_skip_the_final_evaluation_when_preempted(module, final_eval, monkeypatch, tmp_path):
    config = ConfigDict({"fid": {"num_samples": 8}})
    calls = []
    monkeypatch.setattr(module, "make_task", lambda c: object())
    monkeypatch.setattr(module, "run_training", lambda task, c, w: TrainResult(
        state={"task": {}}, step=4, train_metrics={}, eval_metrics={}, preempted=True, num_steps=9,
        workdir=str(w)))
    monkeypatch.setattr(module, final_eval, lambda *a, **k: calls.append(a))
    with pytest.raises(Preempted, match="preempted at step 4 of 9") as info:
        module.train(config, str(tmp_path))
    assert info.value.exit_code == EXIT_PREEMPTED and not calls
    assert not list(tmp_path.iterdir())  # no evaluation file written

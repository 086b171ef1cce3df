"""One-line adoption: ``CoresetCallback(fraction=...)`` puts the CoresetSampler into the user's DataLoader itself,
or finds the one the loader already has; the result trains exactly what the explicit form trains, under DDP and
resume too; LightningCLI configures it from YAML."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from grace_lightning import CoresetCallback, CoresetSampler
from tests.harness import Recorder, TopLoss, load_records, load_weights
from tests.toy import IndexedBlobs, TinyClassifier, quiet_trainer

POOL, BATCH = 256, 8


def _fit(out_dir, tag, *, form, devices=1, max_epochs=3, strategy="random", ckpt_path=None, save=False, workers=0):
    """One fit in the given adoption form; ``Recorder`` writes what each rank trained."""
    dataset = IndexedBlobs(n=POOL)
    if form == "explicit":
        sampler = CoresetSampler(dataset, fraction=0.25, seed=11)
        loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers)
        coreset = CoresetCallback(sampler, strategy=strategy, seed=11)
    elif form == "found":  # the loader has the sampler; the callback is not told
        loader = DataLoader(dataset, batch_size=BATCH, sampler=CoresetSampler(dataset, fraction=0.25, seed=11),
                            num_workers=workers)
        coreset = CoresetCallback(strategy=strategy, seed=11)
    else:  # one line: the user's loader is unchanged
        loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers)
        coreset = CoresetCallback(fraction=0.25, strategy=strategy, seed=11)
    callbacks = [coreset, Recorder(out_dir, tag)]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=out_dir / "steps", filename="{step}", every_n_train_steps=1, save_top_k=-1))
    trainer = quiet_trainer(
        devices=devices, strategy="ddp_fork" if devices > 1 else "auto", max_epochs=max_epochs,
        enable_checkpointing=save, callbacks=callbacks,
    )
    with torch.random.fork_rng():  # every run starts its dropout stream at the same state, whatever ran before
        torch.manual_seed(0)
        trainer.fit(TinyClassifier(dropout=0.2), loader, ckpt_path=ckpt_path)  # dropout: RNG streams must match too
    return coreset


@pytest.mark.parametrize("form", ["one_line", "found"])
def test_sampler_less_forms_train_exactly_what_the_explicit_form_trains(tmp_path, form):
    """Same batches, same selections, bit-identical weights: adoption changes nothing but the lines the user writes."""
    _fit(tmp_path, "explicit", form="explicit", strategy=TopLoss())
    coreset = _fit(tmp_path, form, form=form, strategy=TopLoss())
    assert isinstance(coreset.sampler, CoresetSampler) and coreset.sampler.budget == 64
    a, b = load_records(tmp_path, "explicit", 1)[0], load_records(tmp_path, form, 1)[0]
    assert a["num_training_batches"] == b["num_training_batches"] == [8, 8, 8]  # the coreset's epoch, not the pool's
    assert a["batches"] == b["batches"] and a["selections"] == b["selections"]
    wa, wb = load_weights(tmp_path, "explicit"), load_weights(tmp_path, form)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_one_line_adoption_with_two_ranks_and_loader_workers(tmp_path):
    """Under ddp_fork the injected sampler shards the subset: disjoint equal shards whose union is the selection."""
    _fit(tmp_path, "run", form="one_line", devices=2, workers=2)
    rank0, rank1 = load_records(tmp_path, "run", 2)
    assert rank0["selections"] == rank1["selections"]
    assert rank0["num_training_batches"] == [4, 4, 4]
    for epoch in range(3):
        shard0 = [i for p, b in rank0["batches"].items() if p // 4 == epoch for i in b]
        shard1 = [i for p, b in rank1["batches"].items() if p // 4 == epoch for i in b]
        assert len(shard0) == len(shard1) == 32 and not set(shard0) & set(shard1)
        assert sorted(shard0 + shard1) == sorted(rank0["selections"][epoch])


@pytest.mark.parametrize("devices", [1, 2])
def test_one_line_adoption_resumes_bit_exactly(tmp_path, devices):
    """A mid-epoch checkpoint of a one-line run restores the sampler it built, before the loader is even requested."""
    _fit(tmp_path, "full", form="one_line", devices=devices, strategy=TopLoss(), save=True)
    per_epoch = POOL // 4 // BATCH // devices
    ckpt = tmp_path / "steps" / f"step={per_epoch + per_epoch // 2 + 1}.ckpt"
    _fit(tmp_path, "resumed", form="one_line", devices=devices, strategy=TopLoss(), ckpt_path=ckpt)
    full, resumed = load_records(tmp_path, "full", devices), load_records(tmp_path, "resumed", devices)
    for rank in range(devices):
        positions = sorted(resumed[rank]["batches"])
        assert positions[0] == per_epoch + per_epoch // 2 + 1
        assert all(resumed[rank]["batches"][p] == full[rank]["batches"][p] for p in positions)
        assert resumed[rank]["final_selection"] == full[rank]["final_selection"]
    wa, wb = load_weights(tmp_path, "full"), load_weights(tmp_path, "resumed")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lightning_cli_configures_the_one_line_form_from_yaml(tmp_path):
    """A LightningCLI run from a YAML file alone: the callback's own arguments, the user's unchanged DataModule."""
    pytest.importorskip("jsonargparse")
    (tmp_path / "cli_app.py").write_text(textwrap.dedent('''
        import json, sys
        import lightning as L
        from lightning.pytorch.cli import LightningCLI
        from torch.utils.data import DataLoader
        sys.path.insert(0, %r)
        from tests.toy import IndexedBlobs, TinyClassifier
        from grace_lightning import CoresetCallback

        class Blobs(L.LightningDataModule):
            def __init__(self, batch_size: int = 8):
                super().__init__()
                self.batch_size = batch_size
            def train_dataloader(self):
                return DataLoader(IndexedBlobs(n=256), batch_size=self.batch_size, shuffle=True)

        cli = LightningCLI(TinyClassifier, Blobs, run=False, save_config_kwargs={"overwrite": True})
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        coreset = next(c for c in cli.trainer.callbacks if isinstance(c, CoresetCallback))
        print("RESULT", json.dumps({"batches": cli.trainer.num_training_batches, "budget": coreset.sampler.budget,
                                    "strategy": coreset.strategy.name, "refreshes": len(coreset.history)}))
    ''' % str(__import__("pathlib").Path(__file__).resolve().parents[1])))
    (tmp_path / "config.yaml").write_text(textwrap.dedent('''
        trainer:
          accelerator: cpu
          devices: 1
          max_epochs: 3
          logger: false
          enable_checkpointing: false
          enable_progress_bar: false
          callbacks:
            - class_path: grace_lightning.CoresetCallback
              init_args:
                fraction: 0.25
                strategy: grace
                refresh_every_n_epochs: 1
        data:
          batch_size: 8
    '''))
    import subprocess

    done = subprocess.run(
        [sys.executable, str(tmp_path / "cli_app.py"), "--config", str(tmp_path / "config.yaml")],
        capture_output=True, text=True, cwd=tmp_path, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT"):])
    assert result == {"batches": 8, "budget": 64, "strategy": "grace", "refreshes": 3}  # the first selection and two epoch ends


class _Never(Callback):
    def on_train_batch_start(self, *args):
        raise AssertionError("a training step ran although the set-up is wrong")


def _loader(**kwargs):
    return DataLoader(IndexedBlobs(n=POOL), batch_size=BATCH, **kwargs)


def test_budget_given_to_the_callback_and_the_sampler_fails_at_construction():
    sampler = CoresetSampler(IndexedBlobs(n=POOL), fraction=0.25)
    with pytest.raises(ValueError, match="budget is the sampler's"):
        CoresetCallback(sampler, fraction=0.3)
    with pytest.raises(ValueError, match="`fraction` must be in \\(0, 1\\]"):
        CoresetCallback(fraction=1.5)
    with pytest.raises(ValueError, match="exactly one of `fraction`"):
        CoresetCallback(fraction=0.3, size=10)


def test_no_sampler_and_no_budget_fails_before_training_with_both_fixes():
    trainer = quiet_trainer(callbacks=[CoresetCallback(strategy="random"), _Never()])
    with pytest.raises(ValueError, match=r"CoresetCallback\(fraction=0.3\).*CoresetCallback\(sampler\)"):
        trainer.fit(TinyClassifier(), _loader(shuffle=True))


def test_a_budget_and_a_loader_with_its_own_sampler_fail_before_training():
    dataset = IndexedBlobs(n=POOL)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=CoresetSampler(dataset, fraction=0.25))
    trainer = quiet_trainer(callbacks=[CoresetCallback(fraction=0.3, strategy="random"), _Never()])
    with pytest.raises(ValueError, match="Give the budget once"):
        trainer.fit(TinyClassifier(), loader)


def test_several_training_loaders_without_a_sampler_fail_with_the_explicit_form():
    trainer = quiet_trainer(callbacks=[CoresetCallback(fraction=0.25, strategy="random"), _Never()])
    with pytest.raises(ValueError, match="single DataLoader only"):
        trainer.fit(TinyClassifier(), {"a": _loader(shuffle=True), "b": _loader(shuffle=True)})


def test_two_callbacks_on_one_sampler_fail_at_setup():
    dataset = IndexedBlobs(n=POOL)
    sampler = CoresetSampler(dataset, fraction=0.25)
    # Different strategies, so Lightning's own check (one state_key per callback type) lets both through.
    callbacks = [CoresetCallback(sampler, strategy="random"), CoresetCallback(sampler, strategy="full"), _Never()]
    with pytest.raises(ValueError, match="two CoresetCallbacks drive the same CoresetSampler"):
        quiet_trainer(callbacks=callbacks).fit(TinyClassifier(), DataLoader(dataset, batch_size=BATCH, sampler=sampler))


def test_a_sampler_built_on_another_pool_fails_before_training():
    sampler = CoresetSampler(IndexedBlobs(n=POOL + 64), fraction=0.25)
    loader = DataLoader(IndexedBlobs(n=POOL), batch_size=BATCH, sampler=sampler)
    trainer = quiet_trainer(callbacks=[CoresetCallback(sampler, strategy="random"), _Never()])
    with pytest.raises(ValueError, match="pool of 320 examples but its DataLoader's dataset has 256"):
        trainer.fit(TinyClassifier(), loader)


@pytest.mark.parametrize("strategy,given,warned", [
    ("random", {"reference": IndexedBlobs(n=16, seed=1)}, "`reference` is ignored"),
    ("grace", {"quality": torch.zeros(POOL)}, "`quality` is ignored"),
])
def test_inputs_the_strategy_ignores_are_named_at_construction(strategy, given, warned):
    sampler = CoresetSampler(IndexedBlobs(n=POOL), fraction=0.25)
    with pytest.warns(UserWarning, match=warned):
        CoresetCallback(sampler, strategy=strategy, **given)


def test_inputs_the_strategy_reads_draw_no_warning(recwarn):
    sampler = CoresetSampler(IndexedBlobs(n=POOL), fraction=0.25)
    CoresetCallback(sampler, strategy="gip", reference=IndexedBlobs(n=16, seed=1), quality=torch.zeros(POOL))
    assert not [w for w in recwarn if "ignored" in str(w.message)]

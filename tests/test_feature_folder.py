"""Feature folders hold one run: an interrupted extract_to followed by another run never mixes the two
(refused, or overwrite=True replaces, or resume=True continues with identical settings); load_features checks
every shard against the indexed run; stale per-rank indexes are never merged (also under torch.distributed)."""

import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fastdiff.feature_folder import FeatureFolderError, merge_index, read_run
from fastdiff.features import FeatureExtractor, load_features
from fastdiff.models import ADMUNet
from fastdiff.schedules import VPSchedule

SCHEDULE = VPSchedule("linear", num_train_timesteps=1000)
CFG = dict(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
           attention_resolutions=(), channel_mult=(1, 2), num_head_channels=16)
N = 7


pytestmark = pytest.mark.usefixtures("one_thread")


def model(seed=0):
    torch.manual_seed(seed)
    return ADMUNet(**CFG).eval()


def extractor(m=None, **kw):
    return FeatureExtractor(m if m is not None else model(), SCHEDULE, layers=["input_blocks.1"],
                            timesteps=[20, 300], pool="avg", **kw)


IMAGES = torch.randn(N, 3, 8, 8, generator=torch.Generator().manual_seed(1))
LABELS = torch.arange(N)


def batches(sizes=(2, 2, 2, 1)):
    out, start = [], 0
    for s in sizes:
        out.append((IMAGES[start:start + s], LABELS[start:start + s]))
        start += s
    return out


def interrupted(items, after):
    """The batches, failing (like a crash) when batch ``after`` is requested."""
    for b, item in enumerate(items):
        if b == after:
            raise KeyboardInterrupt("killed")
        yield item


def expected(fx):
    feats = fx(IMAGES)
    return {f"input_blocks.1/t{t}": feats["input_blocks.1"][t] for t in fx.timesteps}


def assert_features(folder, fx):
    loaded = load_features(folder)
    assert torch.equal(loaded["index"], torch.arange(N)) and torch.equal(loaded["labels"], LABELS)
    for k, v in expected(fx).items():
        torch.testing.assert_close(loaded[k], v, rtol=1e-5, atol=1e-6)


def shard_runs(folder):
    from safetensors import safe_open

    runs = set()
    for p in folder.glob("shard-*.safetensors"):
        with safe_open(str(p), "pt") as f:
            runs.add(f.metadata()["fastdiff.run"])
    return runs


def test_run_identity_in_index_and_shards(tmp_path):
    fx = extractor()
    fx.extract_to(tmp_path / "f", batches())
    run = read_run(tmp_path / "f")
    index = json.loads((tmp_path / "f" / "index.json").read_text())
    assert index["run"] == run["run"] and index["settings_hash"] == run["settings_hash"]
    assert index["num_images"] == N and [s["count"] for s in index["shards"]] == [2, 2, 2, 1]
    assert shard_runs(tmp_path / "f") == {run["run"]}
    assert run["settings"]["timesteps"] == [20, 300] and run["settings"]["model"] == "ADMUNet"
    assert_features(tmp_path / "f", fx)


def test_interrupted_then_another_run_never_mixes(tmp_path):
    folder = tmp_path / "f"
    old = extractor(seed=5)
    with pytest.raises(KeyboardInterrupt):
        old.extract_to(folder, interrupted(batches(), after=2))
    old_run = read_run(folder)["run"]
    assert not (folder / "index.json").exists()  # the index comes last: an interrupted run has none
    with pytest.raises(FeatureFolderError):
        load_features(folder)  # the run is incomplete: nothing is merged
    new = extractor(seed=6)  # another run (another seed) into the same folder
    with pytest.raises(FeatureFolderError, match="holds another feature run.*overwrite=True.*resume=True") as err:
        new.extract_to(folder, batches())
    assert old_run in str(err.value) and "interrupted" in str(err.value)
    assert shard_runs(folder) == {old_run}  # nothing was written
    with pytest.raises(FeatureFolderError, match="seed"):  # resume needs the same settings
        new.extract_to(folder, batches(), resume=True)
    (folder / "notes.txt").write_text("mine")
    new.extract_to(folder, batches(), overwrite=True)
    new_run = read_run(folder)["run"]
    assert new_run != old_run and shard_runs(folder) == {new_run}
    assert (folder / "notes.txt").read_text() == "mine"  # only the run's own files are removed
    assert_features(folder, new)


def test_resume_continues_and_skips_finished_shards(tmp_path):
    folder = tmp_path / "f"
    fx = extractor(seed=3)
    with pytest.raises(KeyboardInterrupt):
        fx.extract_to(folder, interrupted(batches(), after=3))
    run = read_run(folder)["run"]
    finished = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")}
    assert len(finished) == 3
    fx2 = extractor(seed=3)  # the same settings, a new extractor (as after a restart)
    fx2.extract_to(folder, batches(), resume=True)
    assert fx2.forward_calls == 1  # only the last batch (1 image x 2 timesteps, one forward) ran
    assert read_run(folder)["run"] == run and shard_runs(folder) == {run}
    assert all(folder.joinpath(n).stat().st_mtime_ns == t for n, t in finished.items())
    assert_features(folder, fx)
    # a complete run resumed again does nothing and keeps its index
    before = (folder / "index.json").read_bytes()
    fx3 = extractor(seed=3)
    fx3.extract_to(folder, batches(), resume=True)
    assert fx3.forward_calls == 0 and (folder / "index.json").read_bytes() == before


def test_resume_with_other_weights_is_refused(tmp_path):
    folder = tmp_path / "f"
    with pytest.raises(KeyboardInterrupt):
        extractor(model(seed=0)).extract_to(folder, interrupted(batches(), after=1))
    with pytest.raises(FeatureFolderError, match="weights"):
        extractor(model(seed=1)).extract_to(folder, batches(), resume=True)


def test_load_features_refuses_a_shard_of_another_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    extractor(seed=1).extract_to(a, batches())
    extractor(seed=2).extract_to(b, batches())
    shutil.copy(b / "shard-r000-000001.safetensors", a / "shard-r000-000001.safetensors")
    with pytest.raises(FeatureFolderError, match="shard-r000-000001.*belongs to run.*mixes runs"):
        load_features(a)


def test_stale_rank_index_is_never_merged(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    fx = extractor()
    for rank in (0, 1):  # an earlier two-rank run, complete
        fx.extract_to(old, batches(), rank=rank, world_size=2)
    old_full = load_features(old)
    assert torch.equal(old_full["index"], torch.arange(N))
    fx.extract_to(new, batches(), rank=0, world_size=2)  # a new run: only rank 0 has finished
    for name in ["index-rank1.json"] + [p.name for p in old.glob("shard-r001-*")]:
        shutil.copy(old / name, new / name)  # the earlier run's rank 1 left behind
    with pytest.raises(FeatureFolderError, match=r"rank\(s\) \[1\]"):
        merge_index(new)
    with pytest.raises(FeatureFolderError, match=r"rank\(s\) \[1\]"):
        load_features(new)
    assert not (new / "index.json").exists()
    # the new run's rank 1 joins its run (not the stale one) and overwrites the stale index
    fx.extract_to(new, batches(), rank=1, world_size=2)
    assert json.loads((new / "index-rank1.json").read_text())["run"] == read_run(new)["run"]
    loaded = load_features(new)
    assert torch.equal(loaded["index"], torch.arange(N))
    # rank 0 started again without a flag: it has already written this run, so it is another run
    with pytest.raises(FeatureFolderError, match="another feature run"):
        fx.extract_to(new, batches(), rank=0, world_size=2)


def test_overwrite_removes_leftovers_of_other_runs(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    fx = extractor()
    for rank in (0, 1):
        fx.extract_to(old, batches(), rank=rank, world_size=2)
    fx.extract_to(new, batches())
    for p in old.glob("*rank*1*"):  # index-rank1.json and rank 1's shards of the old run
        shutil.copy(p, new / p.name)
    (new / ".shard-r000-000009.safetensors.fastdiff-tmp-0badf00d.safetensors").write_bytes(b"partial")
    fx.extract_to(new, batches(), overwrite=True)
    run = read_run(new)["run"]
    assert shard_runs(new) == {run}
    assert sorted(p.name for p in new.iterdir()) == sorted(
        ["run.json", "index.json", "index-rank0.json"] + [f"shard-r000-00000{b}.safetensors" for b in range(4)])
    assert_features(new, fx)


def test_older_folders_and_paths(tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "index-rank0.json").write_text(json.dumps({"shards": [], "num_images": 0, "rank": 0}))
    with pytest.raises(FeatureFolderError, match="no run.json"):
        load_features(legacy)
    with pytest.raises(FeatureFolderError, match="unidentified run"):
        extractor().extract_to(legacy, batches())
    with pytest.raises(FeatureFolderError, match="cannot be resumed"):
        extractor().extract_to(legacy, batches(), resume=True)
    extractor().extract_to(legacy, batches(), overwrite=True)
    assert read_run(legacy) is not None and load_features(legacy)["index"].shape == (N,)
    with pytest.raises(FileNotFoundError, match="folder"):
        extractor().extract_to(tmp_path / "no" / "such", batches())
    with pytest.raises(ValueError, match="overwrite and resume"):
        extractor().extract_to(tmp_path / "x", batches(), overwrite=True, resume=True)
    assert not (tmp_path / "x").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        extractor().extract_to(folder, batches(), overwrite=True)  # RANK / WORLD_SIZE from the group
    finally:
        dist.destroy_process_group()


def test_torch_distributed_replaces_a_stale_run(tmp_path):
    folder = tmp_path / "f"
    fx = extractor(seed=9)
    for rank in (0, 1):  # an earlier complete two-rank run of other settings
        fx.extract_to(folder, batches(), rank=rank, world_size=2)
    merge_index(folder)
    old_run = read_run(folder)["run"]
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
    try:
        os.environ.pop("RANK", None)
        os.environ.pop("WORLD_SIZE", None)
        mp.spawn(_worker_with_env, args=(2, _free_port(), str(folder)), nprocs=2, join=True)
    finally:
        for k, v in env.items():
            if v is not None:
                os.environ[k] = v
    run = read_run(folder)["run"]
    assert run != old_run and shard_runs(folder) == {run}
    assert json.loads((folder / "index.json").read_text())["run"] == run  # merged by rank 0
    assert_features(folder, extractor())


def _worker_with_env(rank: int, world: int, port: int, folder: str) -> None:
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    _rank_worker(rank, world, port, folder)

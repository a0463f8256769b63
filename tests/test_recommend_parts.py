"""`recvae recommend RUN --all-users --output DIR/`: every user as a partitioned Parquet dataset,
one part per `--shard K/N` or per torchrun process (issue 30, "Past one machine").

The union of the parts is the one-process output row for row and bit for bit (the shards score
whole batches, so every user is scored in the batch one process would score it in); a written
part is never rewritten, a killed shard is re-run alone, parts of another run, k or N are
refused, the manifest is written once, by the shard that completes the set.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from recvae import locking
from recvae.cli import main
from recvae.errors import ParameterError
from recvae.recommend_files import table_writer
from recvae.recommend_parts import MANIFEST_FILE, Shard, model_digest
from test_distributed import REPO, TORCHRUN, _env, _free_port, _Procs
from test_recommend_cli import make_log, train

pytest.importorskip("pyarrow")

K, BATCH = 5, 7  # 90 users: 13 batches of 7, the last of 6; 90 / 2 = 45 is no multiple of 7
PARTS = {1: ["part-1-of-1.parquet"], 2: ["part-1-of-2.parquet", "part-2-of-2.parquet"],
         3: ["part-1-of-3.parquet", "part-2-of-3.parquet", "part-3-of-3.parquet"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A RecVAE run: its scores of a user change in the third decimal with the batch it is
    scored in (a product's rounding depends on the batch's shape), so only whole batches per
    shard give the one-process bits."""
    return train(tmp_path_factory, make_log(int_ids=False), "recvae", ["--epochs", "2", "--batch-size", "30"])


@pytest.fixture(scope="module")
def other_run(tmp_path_factory):
    return train(tmp_path_factory, make_log(int_ids=False), "multdae", ["--epochs", "1", "--batch-size", "30"])


@pytest.fixture(scope="module")
def one(run, tmp_path_factory):
    """The one-process output: `--all-users --output one.parquet`."""
    out = tmp_path_factory.mktemp("one") / "one.parquet"
    assert main(["-q", "recommend", str(run), "--all-users", "--k", str(K), "--batch-size", str(BATCH),
                 "--output", str(out)]) == 0
    return pd.read_parquet(out)


def shard(run, out, spec=None, *extra, quiet=True) -> int:
    argv = ["-q"] if quiet else []
    argv += ["recommend", str(run), "--all-users", "--k", str(K), "--batch-size", str(BATCH), "--output", f"{out}/"]
    return main(argv + (["--shard", spec] if spec else []) + list(extra))


def entries(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_union_of_n_shards_is_the_one_process_output_row_for_row(run, one, tmp_path, n):
    out = tmp_path / "all"
    for k in range(1, n + 1):
        assert not (out / MANIFEST_FILE).exists()  # not before the last part
        assert shard(run, out, f"{k}/{n}") == 0
    assert entries(out) == ["_manifest.json", *PARTS[n]]  # no temporary file, no lock left
    # the folder is one table, in the run's user order: ids, ranks, scores bit for bit
    pd.testing.assert_frame_equal(pd.read_parquet(out), one, check_exact=True)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    parts = [pd.read_parquet(out / p["file"]) for p in manifest["parts"]]
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), one, check_exact=True)
    ranges = [p["user_range"] for p in manifest["parts"]]
    assert ranges[0][0] == 0 and ranges[-1][1] == 90 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(start % BATCH == 0 for start, _ in ranges)  # whole batches
    assert [p["rows"] for p in manifest["parts"]] == [len(p) for p in parts]
    assert {key: manifest[key] for key in ("users", "rows", "k", "batch_size", "shards", "include_seen",
                                           "precision", "run_dir", "model_sha256")} == {
        "users": 90, "rows": len(one), "k": K, "batch_size": BATCH, "shards": n, "include_seen": False,
        "precision": "fp32", "run_dir": str(run.resolve()), "model_sha256": model_digest(run)}
    # readers of a folder skip '_' and '.' names: a killed shard's temporary file, the lock
    (out / ".part-1-of-3.parquet.a1b2c3d4.tmp").write_bytes(b"PAR1 half")
    (out / ".recvae.lock").write_text("{}")
    pd.testing.assert_frame_equal(pd.read_parquet(out), one, check_exact=True)
    import pyarrow.dataset as ds

    assert ds.dataset(out, format="parquet").to_table().to_pandas().equals(one)


def test_other_readers_take_the_parts_for_one_table(run, one, tmp_path):
    """DuckDB and Polars read the glob DIR/*.parquet (Polars reads every file of a folder given
    as such, the manifest too): the manifest and temporary files do not match it."""
    out = tmp_path / "all"
    for k in (1, 2):
        assert shard(run, out, f"{k}/2") == 0
    (out / ".part-1-of-2.parquet.a1b2c3d4.tmp").write_bytes(b"PAR1 half")
    expected = one.sort_values(["user", "rank"]).reset_index(drop=True)
    readers = 0
    try:
        import duckdb
    except ImportError:
        pass
    else:
        readers += 1
        got = duckdb.sql(f"select * from read_parquet('{out}/*.parquet')").df()
        got = got.sort_values(["user", "rank"]).reset_index(drop=True)
        assert got["item"].tolist() == expected["item"].tolist() and got["score"].tolist() == expected["score"].tolist()
    try:
        import polars as pl
    except ImportError:
        pass
    else:
        readers += 1
        got = pl.read_parquet(f"{out}/*.parquet").to_pandas().sort_values(["user", "rank"]).reset_index(drop=True)
        assert got["item"].tolist() == expected["item"].tolist() and got["score"].tolist() == expected["score"].tolist()
    if not readers:
        pytest.skip("neither duckdb nor polars is installed")


def test_twelve_shards_sort_by_name_in_the_run_s_user_order(run, one, tmp_path):
    """part-02-of-12 before part-10-of-12: K is zero-padded, so a reader that lists the folder
    by name reads the users in the run's order."""
    out = tmp_path / "all"
    for k in range(12, 0, -1):
        assert shard(run, out, f"{k}/12") == 0
    assert entries(out)[1:4] == ["part-01-of-12.parquet", "part-02-of-12.parquet", "part-03-of-12.parquet"]
    pd.testing.assert_frame_equal(pd.read_parquet(out), one, check_exact=True)


def test_a_finished_shard_is_not_rewritten_and_a_killed_one_is_rerun_alone(run, one, tmp_path, caplog, monkeypatch):
    out = tmp_path / "all"
    assert shard(run, out, "1/2") == 0
    first = (out / "part-1-of-2.parquet").stat()
    # shard 2 stopped mid-way (Ctrl-C): nothing of it is left, and a SIGKILL-ed try's temporary file is there
    from recvae.recommend import RunRecommender

    calls = []

    def stopped(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return scored(self, *args, **kwargs)

    scored = RunRecommender.recommend
    monkeypatch.setattr(RunRecommender, "recommend", stopped)
    assert shard(run, out, "2/2") == 130
    monkeypatch.undo()
    assert entries(out) == ["part-1-of-2.parquet"]
    killed = out / ".part-2-of-2.parquet.Zz9Yx8Wv.tmp"
    killed.write_bytes(b"PAR1 half a part")
    with caplog.at_level(logging.INFO, logger="recvae"):
        assert shard(run, out, "2/2", quiet=False) == 0
    assert entries(out) == ["_manifest.json", "part-1-of-2.parquet", "part-2-of-2.parquet"]  # its leftover gone
    assert f"shard 2 of 2: wrote the top-5 of users 43 to 90 of 90 to {out}/part-2-of-2.parquet" in caplog.messages
    assert f"all 2 parts are in {out} (90 users, 450 rows): _manifest.json lists them" in caplog.messages
    # shard 1 again (its job re-run): one line, the part untouched, the manifest there
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="recvae"):
        assert shard(run, out, "1/2", quiet=False) == 0
    noop = (f"shard 1 of 2: {out}/part-1-of-2.parquet is written already (users 1 to 42, 210 rows, from this run "
            "with the same options); nothing to do (--overwrite rewrites it)")
    assert caplog.messages == [noop]
    again = (out / "part-1-of-2.parquet").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    pd.testing.assert_frame_equal(pd.read_parquet(out), one, check_exact=True)
    # a lost manifest comes back with any shard's re-run, said on the same line
    (out / MANIFEST_FILE).unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="recvae"):
        assert shard(run, out, "1/2", quiet=False) == 0
    assert caplog.messages == [f"{noop}; all 2 parts are in {out} (90 users, 450 rows): _manifest.json lists them"]
    assert json.loads((out / MANIFEST_FILE).read_text())["rows"] == len(one)
    # --overwrite rewrites the part (a new file), to the same rows
    assert shard(run, out, "1/2", "--overwrite") == 0
    assert (out / "part-1-of-2.parquet").stat().st_ino != first.st_ino
    pd.testing.assert_frame_equal(pd.read_parquet(out), one, check_exact=True)
    assert (out / MANIFEST_FILE).is_file()


def test_parts_of_another_run_k_or_number_of_shards_are_refused(run, other_run, tmp_path, capsys):
    out = tmp_path / "all"
    assert shard(run, out, "1/2") == 0
    capsys.readouterr()

    def refused(*argv, runs=run) -> str:
        assert shard(runs, out, *argv) == 2
        return capsys.readouterr().err

    advice = "remove it, choose another directory, or give --overwrite to replace it\n"
    assert refused("2/2", "--k", "6") == (f"recvae: error: --output {out}/: part-1-of-2.parquet was written with --k 5, "
                                          f"and this shard has --k 6; {advice}")
    assert refused("2/2", "--batch-size", "8", "--include-seen") == (
        f"recvae: error: --output {out}/: part-1-of-2.parquet was written with --batch-size 7, no --include-seen, and "
        f"this shard has --batch-size 8, --include-seen; {advice}")
    assert refused("2/3") == (f"recvae: error: --output {out}/: part-1-of-2.parquet is a part of 2 shards, and this is "
                              f"shard 2 of 3: a directory holds the parts of one number of shards; {advice}")
    assert refused(runs=other_run) == (  # no --shard: 1 of 1
        f"recvae: error: --output {out}/: part-1-of-2.parquet is a part of 2 shards, and this is shard 1 of 1: a "
        f"directory holds the parts of one number of shards; {advice}")
    digest = model_digest(run)[:12]
    assert refused("2/2", runs=other_run) == (
        f"recvae: error: --output {out}/: part-1-of-2.parquet was written from another model (the run "
        f"{run.resolve()}, model SHA-256 {digest}...; this run's is {model_digest(other_run)[:12]}...); {advice}")
    assert entries(out) == ["part-1-of-2.parquet"]  # nothing written, nothing removed
    # a file readers would take for data, and a damaged part
    (out / "notes.txt").write_text("mine")
    assert refused("2/2") == (f"recvae: error: --output {out}/: holds notes.txt, which is not a part of "
                              "recommendations; readers take every file of the directory for part of the table (but "
                              "names starting with '_' or '.'): remove it, or choose a new or empty directory\n")
    (out / "notes.txt").rename(out / "_notes.txt")  # a name readers skip: left alone
    (out / "part-2-of-2.parquet").write_bytes(b"not parquet")
    assert refused("1/2").startswith(f"recvae: error: --output {out}/: part-2-of-2.parquet is not a readable Parquet "
                                     "file (")
    # --overwrite: this shard's part is rewritten, the others that do not match are removed
    assert shard(other_run, out, "2/2", "--k", "6", "--overwrite") == 0
    assert entries(out) == ["_notes.txt", "part-2-of-2.parquet"]
    assert shard(other_run, out, "1/2", "--k", "6") == 0
    assert json.loads((out / MANIFEST_FILE).read_text())["k"] == 6


@pytest.mark.parametrize("argv, message", [
    (["--shard", "0/3", "--output", "{tmp}/all/"],
     "--shard 0/3: K counts from 1: expected 1 to 3 (the first shard is 1/3, the last 3/3)"),
    (["--shard", "4/3", "--output", "{tmp}/all/"],
     "--shard 4/3: K counts from 1: expected 1 to 3 (the first shard is 1/3, the last 3/3)"),
    (["--shard", "2", "--output", "{tmp}/all/"],
     "--shard 2: expected K/N: this shard's number K, from 1 to N, and the number of shards N, e.g. 2/8"),
    (["--shard", "1/0", "--output", "{tmp}/all/"], "--shard 1/0: expected at least 1 shard (K/N), got N = 0"),
    (["--shard", "1/14", "--output", "{tmp}/all/"],
     "--shard 1/14: the run's 90 users make 13 batch(es) of --batch-size 7, and each shard scores whole batches: "
     "use at most 13 shards, or a smaller --batch-size"),
    (["--shard", "1/2", "--output", "{tmp}/all.parquet"],
     "--output {tmp}/all.parquet: --shard writes one part of a partitioned Parquet dataset: give a directory ending "
     "in '/' (e.g. {tmp}/all/)"),
    (["--shard", "1/2"], "--output -: --shard writes one part of a partitioned Parquet dataset: give a directory "
                         "ending in '/' (e.g. recommendations/)"),
    (["--output", "{tmp}/some.csv/"], "--output {tmp}/some.csv/: is a file, not a directory (a partitioned dataset "
                                      "is a directory of parts)"),
    (["--output", "{run}/"], "--output {run}/: is a run directory; give the recommendations a directory of their own"),
    (["--output", "{tmp}/no/such/"], "--output {tmp}/no/such/: folder {tmp}/no does not exist"),
])
def test_shard_and_folder_errors_are_one_line_naming_the_flag(run, tmp_path, capsys, argv, message):
    (tmp_path / "some.csv").write_text("user\n")
    fill = {"tmp": tmp_path, "run": run}
    argv = [a.format(**fill) for a in argv]
    assert main(["recommend", str(run), "--all-users", "--k", str(K), "--batch-size", str(BATCH), *argv]) == 2
    assert capsys.readouterr().err == f"recvae: error: {message.format(**fill)}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["some.csv"]  # nothing made


def test_the_folder_and_the_shard_are_checked_before_the_run_is_read(run, tmp_path, capsys):
    missing = tmp_path / "no-run"
    for argv, flag in ((["--output", f"{run}/"], "--output"), (["--output", f"{tmp_path}/all/", "--shard", "0/2"],
                                                               "--shard")):
        assert main(["recommend", str(missing), "--all-users", *argv]) == 2
        assert capsys.readouterr().err.startswith(f"recvae: error: {flag} ")


def test_a_folder_and_a_shard_go_with_all_users_only(run, tmp_path, capsys):
    users = tmp_path / "users.csv"
    users.write_text("uid\nu1\n")
    assert main(["recommend", str(run), "--users", str(users), "--shard", "1/2", "--output", f"{tmp_path}/all/"]) == 2
    assert capsys.readouterr().err == "recvae: error: --shard 1/2: splits the users of the run: it goes with --all-users\n"
    assert main(["recommend", str(run), "--users", str(users), "--output", f"{tmp_path}/all/"]) == 2
    assert capsys.readouterr().err == (f"recvae: error: --output {tmp_path}/all/: a directory (a partitioned Parquet "
                                       "dataset) is written for --all-users; give a file (.csv, .tsv, .parquet) for "
                                       "--users or --input\n")


def test_under_torchrun_each_process_is_its_shard_and_one_file_is_refused(run, one, tmp_path, capsys, monkeypatch):
    """RANK and WORLD_SIZE as torchrun (or a launcher) sets them; no process group is needed."""
    out = tmp_path / "all"
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert shard(run, out) == 0
        assert (out / f"part-{rank + 1}-of-2.parquet").is_file()
    pd.testing.assert_frame_equal(pd.read_parquet(out), one, check_exact=True)
    assert shard(run, out, "1/2") == 2
    assert capsys.readouterr().err == ("recvae: error: --shard 1/2: under torchrun each process is one shard (RANK + 1 "
                                       "of WORLD_SIZE): drop --shard, or start the shards without torchrun\n")
    assert main(["recommend", str(run), "--all-users", "--output", str(tmp_path / "all.parquet")]) == 2
    assert capsys.readouterr().err == (f"recvae: error: --output {tmp_path}/all.parquet: under torchrun (2 processes) "
                                       f"every process would write this one table; give a directory ending in '/' "
                                       f"(e.g. {tmp_path}/all/), into which each process writes its part of a "
                                       "partitioned Parquet dataset\n")
    assert not (tmp_path / "all.parquet").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: the single file as ever
    assert main(["-q", "recommend", str(run), "--all-users", "--k", str(K), "--batch-size", str(BATCH),
                 "--output", str(tmp_path / "all.parquet")]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "all.parquet"), one, check_exact=True)


def test_a_part_without_rows_has_the_columns_types(tmp_path):
    like = pd.DataFrame({"user": ["u1"], "rank": [1], "item": ["m1"], "score": pd.Series([0.5], dtype="float32"),
                         "source": ["model"]})
    with table_writer(str(tmp_path / "p.parquet"), metadata={"recvae.part": "{}"}, like=like):
        pass
    import pyarrow.parquet as pq

    schema = pq.read_schema(tmp_path / "p.parquet")
    types = [str(t) for t in schema.types]  # strings (large ones with pandas' str dtype), never null
    assert types[1:4:2] == ["int64", "float"] and all(types[j] in ("string", "large_string") for j in (0, 2, 4))
    assert schema.metadata[b"recvae.part"] == b"{}"
    with table_writer(str(tmp_path / "q.parquet"), like=like) as write:
        write(like)
    assert pd.read_parquet(tmp_path).equals(like)  # the empty part and a full one: one table


def test_the_manifest_lock_waits_for_its_holder(tmp_path):
    got = []

    def second():
        with locking.hold(tmp_path, ".lock", param="output", wait=True):
            got.append(time.monotonic())

    with locking.hold(tmp_path, ".lock", param="output"):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        assert not got  # waiting, not refused
        released = time.monotonic()
    thread.join(timeout=10)
    assert got and got[0] >= released
    with locking.hold(tmp_path, ".lock", param="output"):
        with pytest.raises(locking.RunLocked):
            with locking.hold(tmp_path, ".lock", param="output"):
                pass


def test_shard_ranges_are_whole_batches_split_evenly():
    assert [Shard(k, 3).user_range(90, 7) for k in (1, 2, 3)] == [(0, 28), (28, 56), (56, 90)]
    with pytest.raises(ParameterError, match="10 users make 1 batch"):  # shard 2 would have none
        Shard(2, 2).user_range(10, 1000)
    assert Shard(1, 1).user_range(90, 1000) == (0, 90)
    assert [Shard(k, 4).user_range(8, 2) for k in (1, 2, 3, 4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert Shard(3, 12).file_name == "part-03-of-12.parquet" and Shard(2, 2).file_name == "part-2-of-2.parquet"


# -- separate processes ------------------------------------------------------------------------
def _recommend(*args) -> list[str]:
    return [sys.executable, "-m", "recvae", "recommend", *map(str, args), "--all-users", "--k", str(K),
            "--batch-size", str(BATCH)]


@pytest.mark.slow
def test_three_shards_at_once_write_one_manifest_and_the_one_process_table(run, tmp_path):
    """Three processes started together (a job array): every part, one manifest, the table of one
    process (all with one thread, as the reference)."""
    with _Procs() as procs:
        procs.start(_recommend(run, "--output", tmp_path / "one.parquet"), env=_env())
        for k in (1, 2, 3):
            procs.start(_recommend(run, "--output", f"{tmp_path}/all/", "--shard", f"{k}/3"), env=_env())
        results = procs.wait()
    assert [rc for rc, _ in results] == [0, 0, 0, 0], results
    assert entries(tmp_path / "all") == ["_manifest.json", *PARTS[3]]
    assert sum("all 3 parts are in" in text for _, text in results) >= 1
    one = pd.read_parquet(tmp_path / "one.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "all"), one, check_exact=True)
    assert json.loads((tmp_path / "all" / MANIFEST_FILE).read_text())["rows"] == len(one)


@pytest.mark.slow
def test_torchrun_two_processes_write_the_one_process_table(run, tmp_path):
    """`torchrun --nproc_per_node=2 -m recvae recommend RUN --all-users --output DIR/`: rank r
    writes part r+1 of 2, the last one the manifest; a single file is refused by every rank."""
    env = _env()
    reference = subprocess.run(_recommend(run, "--output", tmp_path / "one.parquet"), env=env, cwd=REPO,
                               capture_output=True, text=True, timeout=180)
    assert reference.returncode == 0, reference.stderr
    launch = [*TORCHRUN, "--nproc_per_node=2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
              "-m", "recvae", "recommend", str(run), "--all-users", "--k", str(K), "--batch-size", str(BATCH)]
    with _Procs() as procs:
        procs.start([*launch, "--output", f"{tmp_path}/all/"], env=env)
        [(rc, text)] = procs.wait()
    assert rc == 0, text
    assert "shard 1 of 2 (torchrun): wrote the top-5 of users 1 to 42 of 90" in text
    assert "shard 2 of 2 (torchrun): wrote the top-5 of users 43 to 90 of 90" in text
    assert entries(tmp_path / "all") == ["_manifest.json", *PARTS[2]]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "all"), pd.read_parquet(tmp_path / "one.parquet"),
                                  check_exact=True)
    launch[launch.index("--master-port") + 1] = str(_free_port())
    with _Procs() as procs:
        procs.start([*launch, "--output", tmp_path / "two.parquet"], env=env)
        [(rc, text)] = procs.wait()
    assert rc != 0 and "recvae: error: --output " in text and "under torchrun (2 processes)" in text
    assert not (tmp_path / "two.parquet").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_under_torchrun_each_process_takes_the_gpu_of_its_local_rank(run, tmp_path, capsys, monkeypatch):
    """torchrun on a machine with GPUs: "cuda" is GPU LOCAL_RANK in each process (as in training),
    not GPU 0 for all; a process beyond the machine's GPUs is one line, before any work."""
    import torch

    from recvae import distributed

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.use_local_gpu() and chosen == [0]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert shard(run, tmp_path / "all") == 2
    assert capsys.readouterr().err == ("recvae: error: torchrun's process 1 on this machine (LOCAL_RANK) has no GPU of "
                                       "its own: the machine has 1; start at most 1 process(es) per machine "
                                       "(--nproc-per-node)\n")
    assert chosen == [0] and not (tmp_path / "all").exists()

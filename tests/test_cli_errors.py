"""Library errors carry the parameter as data; the command line names the flag the user typed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recvae.cli import main
from recvae.errors import ParameterError, shown
from recvae.models import MultVAE


def test_unknown_dataset_names_the_flag_not_the_library_parameter(capsys):
    assert main(["train", "--dataset", "nope", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("recvae: error: --dataset: unknown MovieLens dataset 'nope'; known: ml-100k")


def test_a_bad_hyperparameter_is_an_error_object_naming_it():
    with pytest.raises(ParameterError) as info:
        MultVAE(latent_dim=0, epochs=1).fit(np.eye(3))  # checked before the data
    assert (info.value.param, info.value.message) == ("latent_dim", "expected a positive integer, got 0")


def test_numpy_values_are_shown_as_plain_numbers(capsys):
    assert shown(np.float64("nan")) == "nan" and shown(np.int64(3)) == "3" and shown("x") == "'x'"
    with pytest.raises(ParameterError, match=r"got nan$"):
        MultVAE(dropout=np.float64("nan"))._check_params()


def test_the_source_is_read_once_with_a_rating_threshold(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(3)
    rows = [(u, i, r) for u in range(150) for i, r in zip(rng.choice(120, 15, replace=False), rng.integers(1, 6, 15))]
    path = tmp_path / "log.csv"
    pd.DataFrame(rows, columns=["user", "item", "rating"]).to_csv(path, index=False)
    calls = []
    from recvae.data import source

    original = source.read_table
    monkeypatch.setattr(source, "read_table", lambda *a, **k: calls.append(a) or original(*a, **k))
    out = tmp_path / "run"
    assert main(["-q", "train", "--data", str(path), "--model", "popularity", "--n-heldout-users", "20",
                 "--show", "0", "--out", str(out)]) == 0
    assert len(calls) == 1
    # what recommend excludes still holds the low ratings of the run's users
    from recvae.rundir import RunDir

    seen, train = RunDir(out).load_seen(), RunDir(out).load_train(RunDir(out).load_model())
    assert seen.nnz > train.nnz


def test_resume_of_a_folder_that_does_not_exist_is_one_line(tmp_path, capsys):
    log = tmp_path / "log.csv"
    log.write_text("user,item\n" + "\n".join(f"{u},{i}" for u in range(60) for i in range(u % 7, u % 7 + 110, 2)))
    out = tmp_path / "nope"
    assert main(["train", "--data", str(log), "--rating-col", "none", "--model", "popularity",
                 "--n-heldout-users", "10", "--out", str(out), "--resume"]) == 2
    assert capsys.readouterr().err.strip() == (f"recvae: error: --resume: {out} does not exist, so there is no run "
                                               "to continue; start it without --resume")
    assert not out.exists()


def test_grouplens_columns_are_recognised_and_what_was_kept_is_said(tmp_path, capsys, caplog):
    import logging

    rng = np.random.default_rng(5)
    rows = [(u, int(i), float(r), 1_000_000 + k) for u in range(1, 121)
            for k, (i, r) in enumerate(zip(rng.choice(150, 12, replace=False), rng.choice([1.0, 2.5, 4.0, 5.0], 12)))]
    rows += [(999, 1, 5.0, 0), (999, 2, 5.0, 0)]  # a user with 2 positives: dropped by the minimum of 5
    path = tmp_path / "ratings.csv"
    pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"]).to_csv(path, index=False)
    with caplog.at_level(logging.INFO, logger="recvae"):
        assert main(["train", "--data", str(path), "--model", "popularity", "--n-heldout-users", "15", "--show", "0",
                     "--out", str(tmp_path / "run")]) == 0
    assert "no 'user'/'item' columns; reading userId, movieId, rating as user, item and rating" in caplog.text
    n_rows = len(rows)
    below = sum(r <= 3.5 for _, _, r, _ in rows)
    assert "kept " in caplog.text and f"interactions of {n_rows:,} rows; dropped {below:,} rows rated <= 3.5" in caplog.text
    assert "users with fewer than 5 interactions" in caplog.text
    import json

    description = json.loads((tmp_path / "run" / "run.json").read_text())
    data = description["data"]
    assert (data["user_col"], data["item_col"], data["rating_col"]) == ("userId", "movieId", "rating")
    kept = description["kept"]  # recorded in the run directory too
    positives = pd.Series([u for u, _, r, _ in rows if r > 3.5]).value_counts()
    few = positives[positives < 5]
    assert (kept["rows"], kept["below_threshold"], kept["duplicates"]) == (n_rows, below, 0)
    assert (kept["users_below_min"], kept["interactions_of_those_users"]) == (len(few), int(few.sum()))
    assert (kept["users"], kept["interactions"]) == (len(positives) - len(few), int(positives.sum() - few.sum()))
    # an explicit flag wins, and a wrong one is still an error naming it
    assert main(["train", "--data", str(path), "--user-col", "uid", "--out", str(tmp_path / "r2")]) == 2
    assert "--user-col: column 'uid' not found" in capsys.readouterr().err


# -- one family of errors: a user's error is one line, anything else a bug with its traceback ----------

def test_every_error_a_user_can_cause_is_of_the_family_and_keeps_its_builtin_base():
    from recvae.cli.common import CLIError
    from recvae.data.download import ChecksumError, DownloadError
    from recvae.data.movielens import DamagedArchiveError
    from recvae.data.prepared import PreparedDataError
    from recvae.distributed import PeerError
    from recvae.errors import ColumnError, InputError, MissingPathError, RecvaeError, UnwritablePathError
    from recvae.experiment import ResumeMismatch
    from recvae.models.device import CUDAUnavailableError
    from recvae.models.training_loop import CheckpointMismatch, NonFiniteLossError
    from recvae.optional import MissingDependencyError
    from recvae.recommend import IdError
    from recvae.rundir import RunFinished, RunLocked
    from recvae.serve.server import WorkerStartupError
    from recvae.signals import Terminated

    builtin = {ParameterError: ValueError, InputError: ValueError, ColumnError: KeyError, ResumeMismatch: ValueError,
               RunLocked: ValueError, CheckpointMismatch: ValueError, NonFiniteLossError: FloatingPointError,
               CUDAUnavailableError: ValueError, PreparedDataError: ValueError, DamagedArchiveError: ValueError,
               DownloadError: OSError, ChecksumError: OSError, IdError: ValueError, PeerError: ConnectionError,
               MissingDependencyError: ImportError, WorkerStartupError: RuntimeError, CLIError: Exception,
               MissingPathError: FileNotFoundError, UnwritablePathError: PermissionError}
    for cls, base in builtin.items():
        assert issubclass(cls, RecvaeError) and issubclass(cls, base), cls
    # a finished run carries its parameters as data (its line names --out); a signal stays control flow
    assert issubclass(RunFinished, RecvaeError) and not issubclass(Terminated, Exception)


def test_an_error_carries_its_parameters_and_file_as_data():
    e = ParameterError("out", "holds files; pass {overwrite} or {resume}", given="runs/a",
                       names=("overwrite", "resume"))
    assert (e.param, e.given, e.message) == ("out", "runs/a", "holds files; pass overwrite or resume")
    assert str(e) == "out runs/a: holds files; pass overwrite or resume"
    assert e.text(lambda n: "--" + n) == "--out runs/a: holds files; pass --overwrite or --resume"
    from recvae.errors import InputError

    bad = InputError("log.csv: line 3", "column {x} {item_col} holds '{1.5}'", names=("item_col",))
    assert (bad.where, bad.param) == ("log.csv: line 3", None)  # braces of a value are not templates
    assert bad.text(lambda n: "--item-col") == "log.csv: line 3: column {x} --item-col holds '{1.5}'"


def test_recommend_and_similar_items_refuse_a_bad_N_with_the_same_error():
    import scipy.sparse as sp

    eye = sp.identity(4, dtype=np.float32, format="csr")
    model = MultVAE(latent_dim=2, hidden_dims=(), epochs=1, batch_size=2).fit(eye)
    for call in (lambda: model.recommend(eye[:1], N=0), lambda: model.similar_items([0], N=0)):
        with pytest.raises(ParameterError) as info:
            call()
        assert (info.value.param, info.value.message) == ("N", "expected a positive integer, got 0")


def test_a_user_error_is_one_line_with_exit_2_and_the_flags_spelt(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main(["train", "--dataset", "ml-100k", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == (f"recvae: error: --out {tmp_path / 'run'}: the directory already holds files (notes.txt); pass "
                   "--overwrite to replace them, or --resume to continue the run there\n")


def test_a_file_system_error_is_one_line(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"recvae: error: RUN_DIR {tmp_path / 'nowhere'}: not a run directory (no run.json)\n"


@pytest.mark.parametrize("error", [KeyError("n_users"), ValueError("operands could not be broadcast"),
                                   OSError("a socket closed")])
def test_any_other_exception_is_a_bug_with_its_traceback(error, monkeypatch, capsys):
    from recvae import __version__
    from recvae.data import movielens

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(movielens, "dataset_status", broken)
    assert main(["datasets"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in broken" in err
    assert err.endswith(f"{type(error).__name__}: {error}\nrecvae: this is a bug in recvae {__version__}; please "
                        "report it with the traceback above\n")


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    with pytest.raises(ParameterError, match="^dataset: unknown MovieLens dataset 'nope'"):
        main(["--debug", "train", "--dataset", "nope", "--out", str(tmp_path / "unused")])


def test_an_error_crosses_processes_with_its_data():
    import pickle

    from recvae.data.download import ChecksumError
    from recvae.errors import InputError, MissingPathError

    for error in (ParameterError("out", "pass {resume}", names=("resume",), given="runs/a"),
                  InputError("log.csv: line 3", "bad"), MissingPathError("run_dir", "gone", given="x"),
                  ChecksumError("f.zip", "sha256", "ab", "cd", "https://example.org/f.zip")):
        back = pickle.loads(pickle.dumps(error))
        assert (type(back), back.args, back.__dict__) == (type(error), error.args, error.__dict__)
    assert back.text(str.upper) == str(error)  # no templates: spelt as it is
    assert pickle.loads(pickle.dumps(ParameterError("out", "pass {resume}", names=("resume",)))).text(
        lambda n: "--" + n) == "--out: pass --resume"


def test_a_file_read_as_one_column_with_separators_in_its_header_says_which_sep(tmp_path, capsys):
    """A ';'-separated .csv got no hint of its separator, only missing columns (issue 28)."""
    from recvae.data import read_interactions

    semi = tmp_path / "log.csv"
    semi.write_text("user;item;rating\n1;2;5\n1;3;4\n")
    with pytest.raises(ParameterError) as info:
        read_interactions(semi)
    assert (info.value.param, info.value.where) == ("sep", str(semi))
    assert str(info.value) == (f"{semi}: sep: its header 'user;item;rating' is one column when split on ','; the file "
                               "looks semicolon-separated: give sep ';'")
    assert read_interactions(semi, sep=";", rating_col="rating", rating_threshold=None,
                             min_user_interactions=1, min_item_interactions=1).nnz == 2
    assert main(["train", "--data", str(semi), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (f"recvae: error: {semi}: --sep: its header 'user;item;rating' is one column "
                                       "when split on ','; the file looks semicolon-separated: give --sep ';'\n")
    piped = tmp_path / "log.tsv"
    piped.write_text("user|item\n1|2\n")
    assert main(["prepare", "--data", str(piped), "--out", str(tmp_path / "prep")]) == 2
    assert capsys.readouterr().err.endswith("split on '\\t'; the file looks pipe-separated: give --sep '|'\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "log.tsv"]  # nothing left behind


@pytest.mark.parametrize("command", ["evaluate", "recommend", "serve", "similar", "refit"])
def test_every_device_help_offers_what_the_device_error_offers(command, capsys):
    """evaluate's help said "cpu or cuda" while its error offers 'auto' (issue 28)."""
    from recvae.cli.common import DEVICE_HELP

    assert DEVICE_HELP == "auto (CUDA when available), cpu or cuda"
    with pytest.raises(SystemExit):
        main([command, "--help"])
    helped = " ".join(capsys.readouterr().out.split())
    assert f"--device DEVICE {DEVICE_HELP} (default: " in helped


def test_a_spreadsheet_or_json_file_is_refused_naming_the_formats_read(tmp_path, capsys):
    """An .xlsx --data was told to pass sep= or format='parquet', library names (issue 28)."""
    from recvae.data import read_interactions

    known = ("known: CSV (.csv), TSV (.tsv, .tab, .data), GroupLens '::' (.dat), Parquet (.parquet, .pq), the text "
             "ones also compressed (.csv.gz, ...)")
    sheet = tmp_path / "log.xlsx"
    sheet.write_bytes(b"PK\x03\x04 not a table")
    with pytest.raises(ParameterError) as info:
        read_interactions(sheet, sep=",")  # even with a separator: split on it, a spreadsheet is garbage
    assert (info.value.param, info.value.given) == ("path", str(sheet))
    assert main(["train", "--data", str(sheet), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (f"recvae: error: --data {sheet}: .xlsx files are not read; save it as CSV or "
                                       f"Parquet ({known})\n")
    odd = tmp_path / "log.txt"
    odd.write_text("user,item\n1,2\n")
    assert main(["prepare", "--data", str(odd), "--out", str(tmp_path / "prep")]) == 2
    assert capsys.readouterr().err == (f"recvae: error: {odd}: cannot tell the format from the extension '.txt'; "
                                       "give --sep (e.g. ',', '\\t', '::') for a text file, or name a Parquet file "
                                       f".parquet; {known}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "log.xlsx"]

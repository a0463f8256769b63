"""MovieLens datasets from GroupLens: registry, download, and readers for their own file layouts.

Files are looked up in the data directory (:func:`~recvae.data.paths.resolve_data_dir`), in
this order:

1. the extracted folder as GroupLens ships it, e.g. ``<data_dir>/ml-1m/ratings.dat``
   (``ml-10M100K/`` for ML-10M; ``<data_dir>/ml-10m/`` is accepted too);
2. the original archive ``<data_dir>/<name>.zip``, read in place without extracting;
3. a download of ``<name>.zip`` from GroupLens into the data directory (when ``download``).

A zip in the data directory that turns out damaged (cut short, a member failing its CRC) is
downloaded again in its place when ``download`` (one warning says so); else the error names it.
Only step 3 writes the files, so a read-only data directory holding them works; the cache of
preprocessed data (:func:`load_movielens`) is written beside them unless ``$RECVAE_CACHE`` or
``cache_dir`` names another folder.
The server is ``$RECVAE_MOVIELENS_URL`` if set, else :data:`BASE_URL` (tests point it at a
local server). The MovieLens terms forbid redistributing the files: never commit them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from recvae.data.download import download as _download
from recvae.data.interactions import NPZ_FORMAT_VERSION, Interactions
from recvae.data.preprocessing import PAPER
from recvae.data.readers import read_table
from recvae.data.paths import CACHE_FOLDER, resolve_cache_dir, resolve_data_dir  # noqa: F401  (CACHE_FOLDER: re-exported)
from recvae.errors import InputError, ParameterError, RecvaeError
from recvae.fileio import read_json, write_json

logger = logging.getLogger(__name__)

#: GroupLens's folder of MovieLens archives; ``$RECVAE_MOVIELENS_URL`` overrides it.
BASE_URL = "https://files.grouplens.org/datasets/movielens"
URL_ENV_VAR = "RECVAE_MOVIELENS_URL"

RATING_COLUMNS = ["user", "item", "rating", "timestamp"]


@dataclass(frozen=True)
class MovieLensSpec:
    """Where a MovieLens release keeps its ratings and titles, and how they are written.

    ``sha256``/``md5`` are digests of ``<name>.zip``. Only digests known with certainty are
    recorded; where both are None the download is not verified (a warning is logged with the
    computed SHA-256). ``download`` verifies SHA-256 when known, else the MD5 GroupLens
    publishes beside each archive (``<name>.zip.md5``).
    """

    name: str
    folder: str  # top folder inside the zip
    ratings_file: str
    ratings_sep: str
    ratings_header: bool  # True: header ``userId,movieId,rating,timestamp``
    items_file: str
    items_sep: str
    items_encoding: str
    items_header: bool
    sha256: str | None = None
    md5: str | None = None

    @property
    def archive(self) -> str:
        return f"{self.name}.zip"


def _csv_release(name: str, md5: str | None = None) -> MovieLensSpec:
    return MovieLensSpec(name, name, "ratings.csv", ",", True, "movies.csv", ",", "utf-8", True, md5=md5)


# SHA-256 digests of the zips are not recorded: none is known here with certainty. The MD5s are
# the ones GroupLens publishes (ml-*.zip.md5), as quoted identically by several projects.
# ml-32m's MD5 is not known here; ml-latest-small changes with every release.
DATASETS: dict[str, MovieLensSpec] = {
    "ml-100k": MovieLensSpec(
        "ml-100k", "ml-100k", "u.data", "\t", False, "u.item", "|", "latin-1", False,
        md5="0e33842e24a9c977be4e0107933c0723",
    ),
    "ml-1m": MovieLensSpec(
        "ml-1m", "ml-1m", "ratings.dat", "::", False, "movies.dat", "::", "latin-1", False,
        md5="c4d9eecfca2ab87c1945afe126590906",
    ),
    "ml-10m": MovieLensSpec(
        "ml-10m", "ml-10M100K", "ratings.dat", "::", False, "movies.dat", "::", "utf-8", False,
        md5="ce571fd55effeba0271552578f2648bd",
    ),
    "ml-20m": _csv_release("ml-20m", md5="cd245b17a1ae2cc31bb14903e1204af3"),
    "ml-25m": _csv_release("ml-25m", md5="6b51fb2759a8657d3bfcbfc42b592ada"),
    "ml-32m": _csv_release("ml-32m"),
    "ml-latest-small": _csv_release("ml-latest-small"),
}


def get_spec(name: str) -> MovieLensSpec:
    """The registry entry for ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise ParameterError("name", f"unknown MovieLens dataset {name!r}; known: {', '.join(DATASETS)}") from None


def movielens_url(name: str) -> str:
    """Download URL of ``name``'s archive (``$RECVAE_MOVIELENS_URL`` or :data:`BASE_URL`)."""
    base = os.environ.get(URL_ENV_VAR) or BASE_URL
    return f"{base.rstrip('/')}/{get_spec(name).archive}"


def download_movielens(name: str, data_dir=None, show_progress: bool = True) -> Path:
    """Download ``<name>.zip`` into the data directory (verified, atomic); return its path."""
    spec = get_spec(name)
    dest = resolve_data_dir(data_dir) / spec.archive
    return _download(movielens_url(name), dest, spec.sha256, show_progress=show_progress, md5=spec.md5)


def _read_member(spec: MovieLensSpec, data_dir, filename: str, download: bool, show_progress: bool, **kwargs):
    """Read ``filename`` of the release from the extracted folder, else the zip, else download."""
    root = resolve_data_dir(data_dir)
    folders = [spec.folder] + ([spec.name] if spec.name != spec.folder else [])
    for folder in folders:
        path = root / folder / filename
        if path.is_file():
            logger.debug("reading %s", path)
            return read_table(path, **kwargs)
    archive = root / spec.archive
    if not archive.is_file():
        if not download:
            looked = [str(root / f / filename) for f in folders] + [str(archive)]
            raise FileNotFoundError(
                f"{spec.name}: {filename} not found; looked for {', '.join(looked)}. "
                "Pass download=True, or place GroupLens's folder or zip in the data directory"
            )
        logger.info("%s not found in %s: downloading %s", spec.name, root, movielens_url(spec.name))
        download_movielens(spec.name, root, show_progress=show_progress)
    try:
        return _read_from_zip(archive, spec, filename, **kwargs)
    except DamagedArchiveError as e:
        if not download:
            raise
        # e.g. a cut download an earlier version kept: fetch it again in its place (atomic, verified)
        logger.warning("%s is damaged (%s): downloading it again from %s", archive, e.reason, movielens_url(spec.name))
        download_movielens(spec.name, root, show_progress=show_progress)
    return _read_from_zip(archive, spec, filename, **kwargs)


class DamagedArchiveError(RecvaeError, ValueError):
    """A zip in the data directory cannot be opened, or a member fails to decompress or its CRC."""

    def __init__(self, archive: Path, reason: str):
        self.archive, self.reason = archive, reason
        super().__init__(f"{archive}: not a valid zip archive ({reason}); delete it to download again")


#: what zipfile and zlib raise on a cut or corrupted archive (NotImplementedError: a garbled header)
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError)


def _read_from_zip(archive: Path, spec: MovieLensSpec, filename: str, **kwargs) -> pd.DataFrame:
    try:
        zf = zipfile.ZipFile(archive)
    except _ZIP_ERRORS as e:
        raise DamagedArchiveError(archive, str(e) or type(e).__name__) from e
    with zf:
        names = zf.namelist()
        wanted = f"{spec.folder}/{filename}"
        member = wanted if wanted in names else next((n for n in names if n.endswith("/" + filename)), None)
        if member is None:
            raise FileNotFoundError(f"{archive}: no {wanted} inside the archive (it holds {len(names)} entries)")
        logger.debug("reading %s from %s", member, archive)
        try:
            return read_table(f"{archive}/{member}", opener=lambda: zf.open(member), **kwargs)
        except _ZIP_ERRORS as e:
            raise DamagedArchiveError(archive, f"{member}: {str(e) or type(e).__name__}") from e
        except ValueError as e:  # garbage decompressed before the CRC failed, or a real parse error
            damage = _member_damage(zf, member)
            if damage is None:
                raise
            raise DamagedArchiveError(archive, f"{member}: {damage}") from e


def _member_damage(zf: zipfile.ZipFile, member: str) -> str | None:
    """Why ``member`` does not decompress to its recorded CRC, or None."""
    try:
        with zf.open(member) as f:
            while f.read(1 << 20):
                pass
    except _ZIP_ERRORS as e:
        return str(e) or type(e).__name__
    return None


def load_movielens_ratings(
    name: str, data_dir=None, download: bool = True, show_progress: bool = True
) -> pd.DataFrame:
    """All explicit ratings of a MovieLens release as a DataFrame.

    Columns ``user`` and ``item`` (GroupLens's integer ids), ``rating`` (float: 1-5, or
    0.5-5 in half stars for the CSV releases) and ``timestamp`` (int, seconds since epoch).
    """
    spec = get_spec(name)
    if spec.ratings_header:
        df = _read_member(spec, data_dir, spec.ratings_file, download, show_progress, sep=spec.ratings_sep)
        df = df.rename(columns={"userId": "user", "movieId": "item"})
    else:
        df = _read_member(
            spec, data_dir, spec.ratings_file, download, show_progress, sep=spec.ratings_sep, names=RATING_COLUMNS
        )
    missing = [c for c in RATING_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{spec.name}/{spec.ratings_file}", f"expected columns {RATING_COLUMNS}, missing {missing}")
    df = df[RATING_COLUMNS]
    return df.astype({"rating": "float64"})


def load_movielens(
    name: str,
    data_dir=None,
    *,
    rating_threshold: float | None = PAPER.rating_threshold,
    min_user_interactions: int = PAPER.min_user_interactions,
    min_item_interactions: int = PAPER.min_item_interactions,
    timestamps: bool = False,
    download: bool = True,
    show_progress: bool = True,
    cache: bool = True,
    cache_dir=None,
    report: dict | None = None,
) -> Interactions:
    """A MovieLens release as binary implicit feedback, preprocessed as in the Mult-VAE paper.

    Defaults are the paper's (:class:`~recvae.data.Preprocessing`): keep ratings > 3.5, then
    users with >= 5 such ratings, no item filter (see :meth:`Interactions.from_dataframe` for the order of the steps). ML-100K gives
    938 users, 1,447 items, 55,361 interactions; ML-20M 136,677 users, 20,108 items.
    ``rating_threshold=None`` keeps every rating. ``timestamps``: keep each interaction's
    GroupLens timestamp (``Interactions.timestamps``, for a time split, :mod:`recvae.data.splits`).

    With ``cache`` the result is kept as ``.npz`` in the cache folder (when it is writable), so a
    second load of a large release skips parsing: ``cache_dir``, else ``$RECVAE_CACHE``, else
    ``<data_dir>/.recvae-cache/`` (:func:`~recvae.data.paths.resolve_cache_dir`). ``report``
    (a dict) receives what preprocessing kept and dropped (see ``Interactions.from_dataframe``),
    kept beside the cache too.
    """
    spec = get_spec(name)
    params = (rating_threshold, min_user_interactions, min_item_interactions) + (("timestamps",) if timestamps else ())
    cache_file = _cache_path(spec, data_dir, params, cache_dir) if cache else None
    kept_file = None if cache_file is None else cache_file.with_name(cache_file.stem + ".kept.json")
    if cache_file is not None and cache_file.is_file() and (report is None or kept_file.is_file()):
        logger.debug("reading the cached %s", cache_file)
        if report is not None:
            try:
                report.update(read_json(kept_file))
            except ValueError:  # damaged: the counts are not worth a parse
                logger.debug("%s is not valid JSON; no counts of what was kept", kept_file)
        return Interactions.load(cache_file)
    kept: dict = {}
    df = load_movielens_ratings(name, data_dir, download=download, show_progress=show_progress)
    data = Interactions.from_dataframe(
        df,
        "user",
        "item",
        "rating",
        rating_threshold=rating_threshold,
        min_user_interactions=min_user_interactions,
        min_item_interactions=min_item_interactions,
        timestamp_col="timestamp" if timestamps else None,
        source=f"{spec.name}/{spec.ratings_file}",
        report=kept,
    )
    if report is not None:
        report.update(kept)
    if cache:
        cache_file = _cache_path(spec, data_dir, params, cache_dir)  # the source may be new, or downloaded again
        try:
            data.save(cache_file)
            write_json(cache_file.with_name(cache_file.stem + ".kept.json"), kept)
        except OSError as e:  # a read-only data directory: parse again next time
            logger.debug("not caching %s: %s", spec.name, e)
    return data


def _source_file(spec: MovieLensSpec, data_dir) -> Path | None:
    """The ratings file (extracted) or the zip that :func:`_read_member` would read, if present."""
    root = resolve_data_dir(data_dir)
    for folder in [spec.folder] + ([spec.name] if spec.name != spec.folder else []):
        if (root / folder / spec.ratings_file).is_file():
            return root / folder / spec.ratings_file
    return root / spec.archive if (root / spec.archive).is_file() else None


def _cache_path(spec: MovieLensSpec, data_dir, params: tuple, cache_dir=None) -> Path | None:
    """``<cache folder>/<name>-<key>.npz`` (:func:`resolve_cache_dir`), the key covering the source
    file's name, size and modification time and the preprocessing, so a changed file or setting
    never reads a stale cache."""
    source = _source_file(spec, data_dir)
    if source is None:
        return None
    st = source.stat()
    key = hashlib.sha256(repr((str(source), st.st_size, st.st_mtime_ns, params, NPZ_FORMAT_VERSION)).encode())
    return resolve_cache_dir(cache_dir, data_dir) / f"{spec.name}-{key.hexdigest()[:16]}.npz"


def load_movielens_titles(name: str, data_dir=None, download: bool = False, show_progress: bool = True) -> pd.Series:
    """Movie titles as a Series indexed by GroupLens's item id (e.g. for showing recommendations).

    Reads ``u.item`` (``|``, latin-1) for ML-100K, ``movies.dat`` (``::``; latin-1 for ML-1M,
    utf-8 for ML-10M) or ``movies.csv`` (utf-8, header). Does not download by default.
    """
    spec = get_spec(name)
    kwargs = dict(sep=spec.items_sep, encoding=spec.items_encoding)
    if not spec.items_header:
        kwargs["header"] = None
    df = _read_member(spec, data_dir, spec.items_file, download, show_progress, **kwargs)
    if spec.items_header:
        df = df.rename(columns={"movieId": "item"})
        ids, titles = df["item"], df["title"]
    else:
        ids, titles = df[0], df[1]
    out = pd.Series(titles.to_numpy(), index=pd.Index(ids.to_numpy(), name="item"), name="title")
    return out


def dataset_status(name: str, data_dir=None) -> str:
    """Where ``name`` would be read from in the data directory: folder, zip, or absent."""
    spec = get_spec(name)
    root = resolve_data_dir(data_dir)
    for folder in [spec.folder] + ([spec.name] if spec.name != spec.folder else []):
        if (root / folder / spec.ratings_file).is_file():
            return f"present: {root / folder}/"
    if (root / spec.archive).is_file():
        return f"present: {root / spec.archive}"
    return f"absent (downloads from {movielens_url(name)})"

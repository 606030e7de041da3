"""Dataset sources, all loaded into one schema.

Interactions: `user_id` (str), `item_id` (str), `timestamp` (int seconds), optional `weight`
(rating or count) and optional `split` (`train`/`valid`/`test`, when the source publishes one).
Items: `item_id` (str), `text` (title, categories, description joined), optional extra columns.

Loaders return the data *as read*: ids become strings (they are labels), but timestamps and
weights keep the type they had in the file, so validation can report a wrong type with examples
instead of a loader crashing on it. `normalize` casts after validation has passed.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import logging
import re
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from components.config import DataConfig
from components import synthetic

log = logging.getLogger(__name__)

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
SPLITS = ("train", "valid", "test")

MOVIELENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
# md5 of the two files we read, from GroupLens' distribution (see ../shared/datasets/README.md).
MOVIELENS_MD5 = {"u.data": "6e47046882bad158b0efbb84cd5cb987", "u.item": "c9e7f390115d79079537301d5204f3f7"}
MOVIELENS_GENRES = (
    "unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy "
    "Film-Noir Horror Musical Mystery Romance Sci-Fi Thriller War Western"
).split()
# UniSRec files carry no timestamps; their order is encoded as one second per step from here.
UNISREC_EPOCH = 1_514_764_800  # 2018-01-01, the year of the Amazon 2018 crawl


class DataSourceError(ValueError):
    """The configured source cannot be read (missing folder, file, or a checksum mismatch)."""

    exit_code = 2  # a CLI prints the message and exits with this, no traceback


@dataclass(frozen=True)
class RawDataset:
    # A LazyFrame when loaded with `lazy=True` from Parquet files: nothing is read until asked.
    interactions: pl.DataFrame | pl.LazyFrame
    items: pl.DataFrame
    source: str
    description: str


def source_identity(cfg: DataConfig, seed: int) -> dict:
    """The settings that decide what a source yields (a snapshot records them; the stages after
    validation refuse a snapshot of another source)."""
    if cfg.source == "synthetic":
        return {"source": cfg.source, "seed": seed, "synthetic": dataclasses.asdict(cfg.synthetic)}
    identity = {"source": cfg.source, "path": cfg.path}
    if cfg.source == "unisrec":
        identity["unisrec_name"] = cfg.unisrec_name
    if cfg.source == "files":
        identity["files"] = dataclasses.asdict(cfg.files)
    return identity


def source_stamp(cfg: DataConfig) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file a `files` source reads (empty for the other
    sources): validation re-reads a lazy source to write its snapshot, and refuses to when the
    files changed in between."""
    if cfg.source != "files":
        return {}
    path, stamp = Path(cfg.path), {}
    for name in (cfg.files.interactions, cfg.files.items):
        target = path / name
        files = _parquet_files(path, name)[1] if target.is_dir() or not target.exists() else [target]
        for f in files:
            st = f.stat()
            stamp[str(f)] = (st.st_size, st.st_mtime_ns)
    return stamp


def load_dataset(cfg: DataConfig, seed: int, lazy: bool = False) -> RawDataset:
    """Load the configured source into the RecForge schema (types as read, see module doc).

    `lazy`: Parquet interactions (a file, folder or glob under `files`) come back as a LazyFrame
    that streams from the files; every other source (CSV included) is read whole."""
    if cfg.source == "synthetic":
        inter, items = synthetic.generate(cfg.synthetic, seed)
        s = cfg.synthetic
        desc = f"synthetic (seed {seed}, {s.n_users} users, {s.n_items} items, {s.n_topics} topics)"
        return RawDataset(inter, items, "synthetic", desc)
    path = Path(cfg.path)
    if cfg.source == "movielens-100k":
        return load_movielens(path, download=cfg.download)
    if cfg.source == "unisrec":
        return load_unisrec(path, cfg.unisrec_name)
    return load_files(path, cfg, lazy=lazy)


# --------------------------------------------------------------------------------------------
# MovieLens-100K
# --------------------------------------------------------------------------------------------


def _md5(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def download_movielens(path: Path, url: str = MOVIELENS_URL) -> None:
    """Fetch MovieLens-100K from GroupLens into `path`, verifying the md5 of the files we use.

    Only called when the user sets `data.download: true`; nothing is fetched implicitly.
    """
    log.info("downloading MovieLens-100K from %s", url)
    with urllib.request.urlopen(url, timeout=60) as response:
        payload = response.read()
    path.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        for name, expected in MOVIELENS_MD5.items():
            member = next((m for m in archive.namelist() if m.endswith("/" + name) or m == name), None)
            if member is None:
                raise DataSourceError(f"{url}: archive has no {name}")
            data = archive.read(member)
            actual = hashlib.md5(data).hexdigest()
            if actual != expected:
                raise DataSourceError(f"{url}: {name} md5 {actual} != expected {expected}; not saved")
            (path / name).write_bytes(data)
        genre = next((m for m in archive.namelist() if m.endswith("u.genre")), None)
        if genre:
            (path / "u.genre").write_bytes(archive.read(genre))


def load_movielens(path: Path, download: bool = False) -> RawDataset:
    data_file, item_file = path / "u.data", path / "u.item"
    if not (data_file.exists() and item_file.exists()):
        if not download:
            raise DataSourceError(
                f"MovieLens-100K not found in {path} (need u.data and u.item); point data.path at "
                "the folder, or set data.download=true to fetch it from GroupLens"
            )
        download_movielens(path)
    inter = pl.read_csv(
        data_file,
        separator="\t",
        has_header=False,
        new_columns=["user_id", "item_id", "weight", "timestamp"],
        schema_overrides={"user_id": pl.Utf8, "item_id": pl.Utf8},
    ).select("user_id", "item_id", "timestamp", "weight")
    # u.item is ISO-8859-1 (accented titles); decoding as UTF-8 would mangle or fail.
    text = item_file.read_bytes().decode("iso-8859-1")
    rows = [line.split("|") for line in text.splitlines() if line.strip()]
    genre_names = MOVIELENS_GENRES
    genre_file = path / "u.genre"
    if genre_file.exists():
        pairs = [ln.split("|") for ln in genre_file.read_text("iso-8859-1").splitlines() if "|" in ln]
        genre_names = [name for name, _ in sorted(pairs, key=lambda p: int(p[1]))]
    texts = []
    for row in rows:
        flags = row[5:]
        genres = [g for g, flag in zip(genre_names, flags) if flag.strip() == "1"]
        texts.append(f"{row[1]}. Genres: {', '.join(genres)}." if genres else f"{row[1]}.")
    items = pl.DataFrame(
        {
            "item_id": [row[0] for row in rows],
            "text": texts,
            "release_date": [row[2] for row in rows],
        }
    )
    return RawDataset(inter, items, "movielens-100k", f"MovieLens-100K from {path}")


# --------------------------------------------------------------------------------------------
# UniSRec / RecBole atomic files
# --------------------------------------------------------------------------------------------


def _find_unisrec_name(path: Path) -> str:
    names = sorted(p.name[: -len(".text")] for p in path.glob("*.text"))
    if len(names) != 1:
        raise DataSourceError(
            f"{path}: expected exactly one *.text file to infer the dataset name, found {names}; "
            "set data.unisrec_name"
        )
    return names[0]


def _read_inter(file: Path) -> list[tuple[str, list[str], str]]:
    lines = file.read_text().splitlines()
    header = lines[0].split("\t")
    if header[:3] != ["user_id:token", "item_id_list:token_seq", "item_id:token"]:
        raise DataSourceError(f"{file}: unexpected header {header}")
    out = []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) != 3:
            raise DataSourceError(f"{file}:{n}: expected 3 tab-separated fields")
        out.append((parts[0], parts[1].split(), parts[2]))
    return out


def load_unisrec(path: Path, name: str | None) -> RawDataset:
    """Load RecBole/UniSRec atomic files, keeping their published split.

    `X.train.inter` holds every prefix of a user's training sequence (longest first, histories
    cut to the last 50 items), `X.valid.inter` and `X.test.inter` one row per user. The full
    sequence is rebuilt from the train rows in chronological order plus the valid and test
    targets, and checked against the test row's history. The files carry no timestamps: the
    order is encoded as consecutive seconds from 2018-01-01.
    """
    if not path.is_dir():
        raise DataSourceError(f"UniSRec folder not found: {path}")
    name = name or _find_unisrec_name(path)
    files = {s: path / f"{name}.{s}.inter" for s in SPLITS}
    for extra in (f"{name}.text", f"{name}.item2index", f"{name}.user2index"):
        files[extra] = path / extra
    missing = [str(f) for f in files.values() if not f.exists()]
    if missing:
        raise DataSourceError(f"UniSRec files missing: {', '.join(missing)}")

    index_to_item = {}
    for line in files[f"{name}.item2index"].read_text().splitlines():
        asin, idx = line.split("\t")
        index_to_item[idx] = asin
    index_to_user = {}
    for line in files[f"{name}.user2index"].read_text().splitlines():
        token, idx = line.split("\t")
        index_to_user[idx] = token

    train_rows: dict[str, list[tuple[list[str], str]]] = {}
    for user, hist, target in _read_inter(files["train"]):
        train_rows.setdefault(user, []).append((hist, target))
    valid = {u: (h, t) for u, h, t in _read_inter(files["valid"])}
    users, items, splits = [], [], []
    for user, test_hist, test_target in _read_inter(files["test"]):
        rows = train_rows.get(user, [])[::-1]  # the file lists prefixes longest first
        if rows:
            seq = rows[0][0] + [t for _, t in rows]
        elif user in valid:  # a single training item has no train row: it is the valid history
            seq = list(valid[user][0])
        else:
            seq = list(test_hist)
        n_train = len(seq)
        if user in valid:
            seq.append(valid[user][1])
        seq.append(test_target)
        expected = test_hist + [test_target]
        if seq[-len(expected) :] != expected:
            raise DataSourceError(
                f"{name}: user {user}: train/valid rows do not chain into the test history"
            )
        users.extend([index_to_user.get(user, user)] * len(seq))
        items.extend(index_to_item.get(i, i) for i in seq)
        splits.extend(["train"] * n_train + ["valid"] * (len(seq) - n_train - 1) + ["test"])

    position = pl.int_range(pl.len()).over("user_id")
    inter = pl.DataFrame({"user_id": users, "item_id": items, "split": splits}).with_columns(
        timestamp=(UNISREC_EPOCH + position).cast(pl.Int64)
    ).select("user_id", "item_id", "timestamp", "split")

    text_lines = files[f"{name}.text"].read_text(encoding="utf-8", errors="replace").splitlines()
    item_rows = [line.split("\t", 1) for line in text_lines[1:] if line]
    item_table = pl.DataFrame(
        {
            "item_id": [r[0] for r in item_rows],
            "text": [r[1].strip() if len(r) > 1 else "" for r in item_rows],
        }
    )
    return RawDataset(inter, item_table, "unisrec", f"UniSRec {name} from {path} (published split)")


# --------------------------------------------------------------------------------------------
# The user's own files
# --------------------------------------------------------------------------------------------


PARQUET_SUFFIXES = (".parquet", ".pq")


WILDCARDS = "*?["


def _parquet_files(path: Path, name: str) -> tuple[Path, list[Path]]:
    """The files a folder or glob `name` under `path` names, and the folder they lie below.

    Anything under a hidden folder or with a hidden name (`_` or `.` first, below that folder)
    is the writer's bookkeeping, not data: Spark's `_SUCCESS`, `.crc` checksums, `_temporary/`
    and `.spark-staging-*` folders of a job still running or failed. A Delta table is refused:
    its folder keeps the Parquet files of versions its log has removed."""
    target = path / name
    if target.is_dir() and (target / "_delta_log").is_dir():
        raise DataSourceError(f"{target} is a Delta table: its Parquet files include rows its log has removed "
                              f"(overwrites, deletes). Export the current version to Parquet (for example with "
                              f"Spark or `deltalake`) and point data.files there")
    if target.is_dir():
        base, candidates = target, target.rglob("*")
    else:
        parts = Path(name).parts
        fixed = next(i for i, part in enumerate(parts) if any(c in part for c in WILDCARDS))
        base = path.joinpath(*parts[:fixed])  # an absolute `name` starts from its own root
        # Folder names are taken as written (`data/[2026]` is no pattern): only what follows is.
        pattern = glob.escape(str(base)) + "/" + "/".join(parts[fixed:])
        candidates = map(Path, glob.glob(pattern, recursive=True))
    found = sorted(f for f in candidates
                   if f.is_file() and not any(part.startswith(("_", ".")) for part in f.relative_to(base).parts))
    return base, found


@dataclass(frozen=True)
class ParquetLayout:
    """Parquet files read as one table, as found and checked (footers only, no rows read)."""

    files: list[Path]
    base: Path  # the folder the files lie below (Hive `key=value` folders are relative to it)
    # The columns kept, in the widest type any file holds (ids not yet cast to text).
    schema: dict[str, pl.DataType]
    # Kept id columns whose values come from Hive folder names (taken as written, "007").
    id_keys: list[str]


def parquet_layout(path: Path, name: str, id_columns: tuple[str, ...], columns: list[str] | None) -> ParquetLayout:
    """The Parquet files a folder or glob `name` under `path` names, and the one schema they
    agree on (see `_read_parquet_dataset`); an error naming the file where they do not."""
    target = path / name
    base, found = _parquet_files(path, name)
    if target.is_dir():
        found = [f for f in found if f.suffix.lower() in PARQUET_SUFFIXES]
        if not found:
            raise DataSourceError(f"{target} is a folder, not a data file: point data.files at a CSV, TSV or Parquet "
                                  f"file, or at a folder of Parquet files (this one holds no *.parquet file)")
    elif not found:
        raise DataSourceError(f"no file matches {target}")
    wrong = [str(f) for f in found if f.suffix.lower() not in PARQUET_SUFFIXES]
    if wrong:
        raise DataSourceError(f"{target}: a pattern reads Parquet files only; it matches {wrong[0]}"
                              + (f" and {len(wrong) - 1} more" if len(wrong) > 1 else ""))
    try:
        # The footers only; the paths are files already found (`glob=False`: `[eu]` is a name).
        schemas = {f: pl.scan_parquet(f, glob=False).collect_schema() for f in found}
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataSourceError(f"{target}: not a Parquet file: {str(exc).splitlines()[0]}") from exc
    # Only the columns the caller keeps; an all-null column (Parquet's null type) agrees with any.
    schemas = {f: {c: t for c, t in schema.items() if (columns is None or c in columns) and t != pl.Null}
               for f, schema in schemas.items()}
    kinds: dict[str, dict[str, Path]] = {}
    for f, schema in schemas.items():
        for col, dtype in schema.items():
            kinds.setdefault(col, {}).setdefault("number" if dtype.is_numeric() else str(dtype), f)
    for col, seen in kinds.items():
        if len(seen) > 1:
            (k1, f1), (k2, f2) = list(seen.items())[:2]
            raise DataSourceError(f"{target}: column {col!r} is {k1} in {f1} but {k2} in {f2}: the files must agree")
    # Hive partition values are typed by guess ("007" -> 7): an id read from a folder name is
    # taken from the path as written instead.
    keys = {part.split("=", 1)[0] for f in found for part in f.relative_to(base).parts[:-1] if "=" in part}
    id_keys = [c for c in id_columns if c in keys and (columns is None or c in columns)]
    try:
        wanted = pl.concat([pl.DataFrame(schema=s) for s in schemas.values()], how="diagonal_relaxed").schema
    except pl.exceptions.PolarsError as exc:
        raise DataSourceError(f"{target}: cannot read as one Parquet table: {str(exc).splitlines()[0]}") from exc
    return ParquetLayout(found, base, dict(wanted), id_keys)


def _names_a_dataset(path: Path, name: str) -> bool:
    """Whether `name` under `path` is a folder or glob of Parquet files (else one file)."""
    target = path / name
    return target.is_dir() or (not target.exists() and any(c in name for c in WILDCARDS))


def _read_parquet_dataset(path: Path, name: str, id_columns: tuple[str, ...],
                          columns: list[str] | None, lazy: bool = False) -> pl.DataFrame | pl.LazyFrame:
    """Parquet files as one table: a folder (every `*.parquet` below it, as Spark and Hive write
    them: `date=2026-11-01/part-0.parquet` adds a `date` column) or a glob of Parquet files
    (`events/*/*.parquet`, `**` for any depth). Read lazily: only `columns` (None: all) leave the
    files. Files may differ in columns (a column added later is null in the older files; one
    dropped is null in the newer) and in integer width; a column that is text in one file and a
    number in another is an error naming both."""
    target = path / name
    layout = parquet_layout(path, name, id_columns, columns)
    id_keys = layout.id_keys
    try:
        df = pl.scan_parquet(layout.files, glob=False, hive_partitioning=True, schema=layout.schema,
                             missing_columns="insert", extra_columns="ignore",
                             include_file_paths="__source_file" if id_keys else None,
                             cast_options=pl.ScanCastOptions(integer_cast=["upcast", "allow-float"],
                                                             float_cast="upcast"))
        names = df.collect_schema().names()
    except pl.exceptions.PolarsError as exc:
        raise DataSourceError(f"{target}: cannot read as one Parquet table: {str(exc).splitlines()[0]}") from exc
    if id_keys:
        df = df.with_columns([pl.col("__source_file").str.extract(rf"(?:^|/){re.escape(k)}=([^/]+)/", 1).alias(k)
                              for k in id_keys]).drop("__source_file")
        names = [c for c in names if c != "__source_file"]
    if columns is not None:
        names = [c for c in names if c in columns]
        df = df.select(names)
    df = _ids_as_strings(df, tuple(c for c in id_columns if c in names))
    if lazy:
        return df
    try:
        return df.collect()
    except pl.exceptions.PolarsError as exc:
        raise DataSourceError(f"{target}: cannot read as one Parquet table: {str(exc).splitlines()[0]}") from exc


def _read_table(path: Path, name: str, encoding: str, id_columns: tuple[str, ...],
                columns: list[str] | None = None, lazy: bool = False) -> pl.DataFrame | pl.LazyFrame:
    """The table `name` under `path`: a CSV/TSV/Parquet file, or a folder or glob of Parquet
    files read as one table; `id_columns` as strings exactly as written (no type inference:
    "007" and "7" stay two ids, "0001" stays "0001"). `columns`: what the caller keeps (Parquet
    reads only those). `lazy`: Parquet is scanned, not read (a CSV is read whole either way)."""
    file = path / name
    if _names_a_dataset(path, name):
        return _read_parquet_dataset(path, name, id_columns, columns, lazy=lazy)
    if not file.exists():
        raise DataSourceError(f"file not found: {file}")
    if not file.is_file():
        raise DataSourceError(f"{file} is a special file, not a data file: point data.files at a CSV, TSV or "
                              f"Parquet file, or a folder of Parquet files")
    suffix = file.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        # Parquet keeps its types: integer ids become their decimal text.
        # glob=False: a file name is no pattern (`shop[eu]/events.parquet`).
        try:
            scan = pl.scan_parquet(file, glob=False)
            present = scan.collect_schema().names()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise DataSourceError(f"{file}: not a Parquet file: {str(exc).splitlines()[0]}") from exc
        kept = [c for c in present if columns is None or c in columns]
        df = _ids_as_strings(scan.select(kept), tuple(c for c in id_columns if c in kept))
        return df if lazy else df.collect()
    if suffix not in (".csv", ".tsv", ".txt"):
        raise DataSourceError(f"{file}: unsupported format (use .csv, .tsv or .parquet)")
    separator = "\t" if suffix == ".tsv" else ","
    raw = file.read_bytes()
    if not raw.strip():
        return pl.DataFrame()  # an empty file is a validation failure, not a crash
    # Undecodable bytes become U+FFFD so that validation can point at the rows that hold them.
    text = raw.decode(encoding, errors="replace")
    try:
        header = pl.read_csv(io.StringIO(text), separator=separator, n_rows=0).columns
        as_text = {c: pl.Utf8 for c in id_columns if c in header}
        return pl.read_csv(io.StringIO(text), separator=separator, infer_schema_length=10_000,
                           schema_overrides=as_text)
    except pl.exceptions.NoDataError:
        return pl.DataFrame()
    except pl.exceptions.ComputeError as exc:
        raise DataSourceError(f"{file}: cannot parse as CSV: {exc}") from exc


def column_mapping(cfg: DataConfig) -> dict[str, str | None]:
    """RecForge column -> the source's column (None: absent) for a `files` source."""
    c = cfg.files.columns
    return {"user_id": c.user_id, "item_id": c.item_id, "timestamp": c.timestamp, "weight": c.weight,
            "split": c.split}


def parquet_source(cfg: DataConfig) -> ParquetLayout | None:
    """The layout of a `files` source whose interactions are Parquet (a file, folder or glob),
    with only the mapped columns; None for every other source (those are read whole)."""
    if cfg.source != "files":
        return None
    path, name = Path(cfg.path), cfg.files.interactions
    target = path / name
    columns = [c for c in column_mapping(cfg).values() if c is not None]
    id_columns = (cfg.files.columns.user_id, cfg.files.columns.item_id)
    if _names_a_dataset(path, name):
        return parquet_layout(path, name, id_columns, columns)
    if target.is_file() and target.suffix.lower() in PARQUET_SUFFIXES:
        try:
            schema = pl.scan_parquet(target, glob=False).collect_schema()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise DataSourceError(f"{target}: not a Parquet file: {str(exc).splitlines()[0]}") from exc
        return ParquetLayout([target], target.parent, {c: t for c, t in schema.items() if c in columns}, [])
    return None


def load_files(path: Path, cfg: DataConfig, lazy: bool = False) -> RawDataset:
    fc = cfg.files
    mapping = column_mapping(cfg)
    inter = _read_table(path, fc.interactions, fc.encoding, (fc.columns.user_id, fc.columns.item_id),
                        columns=[c for c in mapping.values() if c is not None], lazy=lazy)
    items = _read_table(path, fc.items, fc.encoding, (fc.item_id_column,))

    schema = inter.collect_schema()
    renamed = {src: dst for dst, src in mapping.items() if src is not None and src in schema}
    inter = inter.select([pl.col(src).alias(dst) for src, dst in renamed.items()])
    inter = _ids_as_strings(inter, ("user_id", "item_id"))
    if "timestamp" in renamed.values() and schema[mapping["timestamp"]] in (pl.Datetime, pl.Date):
        inter = inter.with_columns(pl.col("timestamp").cast(pl.Datetime("us")).dt.epoch("s"))

    if fc.item_id_column in items.columns and fc.item_id_column != "item_id":
        items = items.rename({fc.item_id_column: "item_id"})
    present_text = [c for c in fc.text_columns if c in items.columns]
    if present_text:
        # Text fields joined "title. description"; the source columns stay as extras.
        joined = pl.concat_str(
            [pl.col(c).cast(pl.Utf8).fill_null("").str.strip_chars() for c in present_text],
            separator=". ",
        ).str.strip_chars(". ")
        items = items.with_columns(text=joined)
    items = _ids_as_strings(items, ("item_id",))
    desc = f"files {fc.interactions} + {fc.items} from {path}"
    return RawDataset(inter, items, "files", desc)


def _ids_as_strings(df, columns: tuple[str, ...]):
    """`df` (a DataFrame or LazyFrame) with `columns` cast to text."""
    present = df.collect_schema().names()
    return df.with_columns([pl.col(c).cast(pl.Utf8) for c in columns if c in present])


# --------------------------------------------------------------------------------------------
# After validation
# --------------------------------------------------------------------------------------------


def normalize(raw: RawDataset) -> tuple[pl.DataFrame | pl.LazyFrame, pl.DataFrame]:
    """Cast validated data to the canonical types (only called once validation has passed).
    Lazy interactions stay lazy."""
    inter = raw.interactions
    present = inter.collect_schema().names()
    cols = [
        pl.col("user_id").cast(pl.Utf8),
        pl.col("item_id").cast(pl.Utf8),
        pl.col("timestamp").cast(pl.Int64),
    ]
    if "weight" in present:
        cols.append(pl.col("weight").cast(pl.Float64))
    if "split" in present:
        cols.append(pl.col("split").cast(pl.Utf8))
    items = raw.items.with_columns(pl.col("item_id").cast(pl.Utf8), pl.col("text").cast(pl.Utf8))
    return inter.select(cols), items

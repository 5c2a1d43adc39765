"""Run folders, atomic sharded Parquet, content hashes, manifests and the model registry."""

import io
import multiprocessing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ospo_core import store
from ospo_core.records import IMAGES, VQA, SchemaError, png_struct, to_table


def vqa_rows(n: int, start: int = 0) -> list[dict]:
    return [
        {"item_id": f"{i:07d}", "t2i_category": "attribute", "sub_category": "attribute1_color", "side": "base",
         "k": i % 3, "question_set": "base", "q_index": 0, "question": "Is there a cat?", "p_yes": 0.25 + i / 100,
         "p_no": 0.5, "answer": "no", "ok": True, "reason": None}
        for i in range(start, start + n)
    ]


def png(color: str, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- folders


def test_round_dir_stays_inside_home(tmp_path):
    assert store.round_dir(tmp_path, "round-003") == tmp_path / "runs" / "round-003"
    assert store.round_dir(tmp_path, "2025.06_a") == tmp_path / "runs" / "2025.06_a"
    for bad in ["", "..", "../x", "a/b", "a\\b", ".hidden", "a..b", "/abs", "x" * 200, None]:
        with pytest.raises(ValueError, match="invalid round id"):
            store.round_dir(tmp_path, bad)


def test_ospo_home_from_env_or_cwd(tmp_path, monkeypatch):
    monkeypatch.setenv("OSPO_HOME", str(tmp_path / "home"))
    assert store.ospo_home() == tmp_path / "home"
    monkeypatch.delenv("OSPO_HOME")
    monkeypatch.chdir(tmp_path)
    assert store.ospo_home() == tmp_path.resolve() / ".ospo"


def test_table_dir_takes_plain_table_names_only(tmp_path):
    assert store.table_dir(tmp_path, "pairs") == tmp_path / "pairs"
    for name in ("../pairs", "Pairs", "pairs/x", ""):
        with pytest.raises(ValueError, match="not a plain lowercase name"):
            store.table_dir(tmp_path, name)


# ---------------------------------------------------------------- sharded Parquet


def test_shards_read_back_in_order_with_the_exact_schema(tmp_path):
    d = tmp_path / "vqa"
    # Shard 1 first: order comes from the shard index, not from when a shard finished.
    store.write_table(to_table(vqa_rows(2, start=5), VQA), d, shard=1)
    store.write_table(to_table(vqa_rows(3), VQA), d, shard=0)
    assert store.finished_shards(d) == [0, 1]
    table = store.read_table(d, VQA)
    assert table.schema == VQA
    assert table.column("item_id").to_pylist() == ["0000000", "0000001", "0000002", "0000005", "0000006"]


def test_crash_during_write_leaves_no_shard_and_keeps_the_old_one(tmp_path, monkeypatch):
    d = tmp_path / "vqa"
    store.write_table(to_table(vqa_rows(2), VQA), d)

    def dies_halfway(table, where, **kwargs):
        where.write(b"PAR1 half a file")
        raise KeyboardInterrupt  # like a kill in the middle of the write

    monkeypatch.setattr(store.pq, "write_table", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        store.write_table(to_table(vqa_rows(5), VQA), d)
    with pytest.raises(KeyboardInterrupt):
        store.write_table(to_table(vqa_rows(5), VQA), d, shard=1)
    assert store.finished_shards(d) == [0]
    assert sorted(p.name for p in d.iterdir()) == ["part-00000.parquet"]
    assert store.read_table(d, VQA).num_rows == 2


def test_leftover_temp_file_is_ignored_then_overwritten(tmp_path):
    d = tmp_path / "vqa"
    d.mkdir()
    leftover = d / ".part-00000.parquet.tmp"  # what a killed writer leaves behind
    leftover.write_bytes(b"PAR1 garbage from a killed process")
    assert store.finished_shards(d) == []
    with pytest.raises(FileNotFoundError, match="table 'vqa' has no finished shards"):
        store.read_table(d, VQA)
    store.write_table(to_table(vqa_rows(4), VQA), d)
    assert not leftover.exists()
    assert store.read_table(d, VQA).num_rows == 4


def test_schema_errors_name_table_file_column_and_type(tmp_path):
    d = tmp_path / "vqa"
    table = to_table(vqa_rows(2), VQA)
    store.write_table(table.drop_columns(["p_no"]), d)
    missing = r"table 'vqa' in .*part-00000\.parquet has no column 'p_no' \(expected type double\)"
    with pytest.raises(SchemaError, match=missing):
        store.read_table(d, VQA)

    wrong = table.set_column(VQA.get_field_index("p_yes"), "p_yes", pa.array(["0.9", "0.1"]))
    store.write_table(wrong, d)
    with pytest.raises(SchemaError, match="column 'p_yes' has type string, expected double"):
        store.read_table(d, VQA)

    store.write_table(table.append_column("extra", pa.array([1, 2])), d)
    with pytest.raises(SchemaError, match=r"columns \['extra'\] that its schema does not define"):
        store.read_table(d, VQA)


def test_truncated_shard_says_delete_and_rerun(tmp_path):
    d = tmp_path / "vqa"
    path = store.write_table(to_table(vqa_rows(50), VQA), d)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(store.CorruptShardError, match=r"part-00000\.parquet of table 'vqa'.*Delete that file and"):
        store.read_table(d, VQA)


def test_content_hash_is_about_rows_not_files(tmp_path):
    table = to_table(vqa_rows(6), VQA)
    h = store.content_hash(table)
    store.write_table(table, tmp_path / "one")
    store.write_table(table.slice(0, 2), tmp_path / "two", shard=0)
    store.write_table(table.slice(2), tmp_path / "two", shard=1)
    pq.write_table(table.replace_schema_metadata({"x": "y"}), tmp_path / "other.parquet", compression="none",
                   row_group_size=1)
    assert store.content_hash(tmp_path / "one") == h
    assert store.content_hash(tmp_path / "two") == h
    assert store.content_hash(pq.read_table(tmp_path / "other.parquet")) == h
    assert store.content_hash(pa.Table.from_batches(table.to_batches(max_chunksize=1))) == h

    assert store.content_hash(table.slice(0, 5)) != h
    assert store.content_hash(pa.concat_tables([table.slice(1), table.slice(0, 1)])) != h  # row order counts
    assert store.content_hash(table.rename_columns([*VQA.names[:-1], "why"])) != h
    changed = table.set_column(VQA.get_field_index("p_no"), "p_no", pa.array([0.5] * 5 + [0.5000001]))
    assert store.content_hash(changed) != h
    # Values that print alike must not hash alike: null vs "", and how strings split into list items.
    assert store.content_hash(pa.table({"s": [None]})) != store.content_hash(pa.table({"s": [""]}))
    assert store.content_hash(pa.table({"l": [["ab", "c"]]})) != store.content_hash(pa.table({"l": [["a", "bc"]]}))


def test_image_tables_open_with_datasets_as_pil_images(tmp_path, monkeypatch):
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    import datasets

    rows = [
        {"item_id": "0000000", "side": "base", "k": k, "seed": k, "prompt": "a red cube",
         "image": png_struct(png(color, size=8 + k)), "image_tokens": [1, 2, 3], "ok": True}
        for k, color in enumerate(["red", "blue"])
    ]
    d = tmp_path / "images"
    store.write_table(to_table(rows, IMAGES), d)
    ds = datasets.load_dataset("parquet", data_files=str(d / "part-*.parquet"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds.features["image"], datasets.Image)
    first = ds[0]
    assert isinstance(first["image"], Image.Image) and first["image"].size == (8, 8)
    assert first["image"].getpixel((0, 0)) == (255, 0, 0)
    assert ds[1]["image"].size == (9, 9) and first["image_tokens"] == [1, 2, 3]
    # The metadata does not disturb our own reader.
    assert store.read_table(d, IMAGES).column("image").to_pylist()[0]["bytes"] == rows[0]["image"]["bytes"]


# ---------------------------------------------------------------- manifest and registry


def test_manifest_round_trip(tmp_path):
    rd = store.round_dir(tmp_path, "round-001")
    with pytest.raises(FileNotFoundError, match="no manifest"):
        store.read_manifest(rd)
    manifest = {"config": {"seed": 42}, "tables": {"pairs": {"rows": 3, "hash": "ab"}}}
    store.write_manifest(rd, manifest)
    assert store.read_manifest(rd) == manifest
    assert sorted(p.name for p in rd.iterdir()) == ["manifest.json"]
    with pytest.raises(ValueError):
        store.write_manifest(rd, {"loss": float("nan")})
    assert store.read_manifest(rd) == manifest  # a refused write leaves the old manifest


def test_registry_order_replace_and_latest_promoted(tmp_path):
    assert store.list_entries(tmp_path) == [] and store.latest_promoted(tmp_path) is None
    store.register(tmp_path, {"round_id": "r1", "adapter": "a1", "parent": "base", "promoted": True})
    store.register(tmp_path, {"round_id": "r2", "adapter": "a2", "parent": "r1", "promoted": False})
    assert store.latest_promoted(tmp_path)["round_id"] == "r1"
    # Promoting r2 after its evaluation replaces its entry in place.
    store.register(tmp_path, {"round_id": "r2", "adapter": "a2", "parent": "r1", "promoted": True,
                              "metrics": {"score": 0.5}})
    assert [e["round_id"] for e in store.list_entries(tmp_path)] == ["r1", "r2"]
    assert store.latest_promoted(tmp_path)["metrics"] == {"score": 0.5}
    with pytest.raises(ValueError, match="needs 'promoted'"):
        store.register(tmp_path, {"round_id": "r3"})
    with pytest.raises(ValueError, match="invalid round id"):
        store.register(tmp_path, {"round_id": "../r3", "promoted": False})


def _register_many(home: str, writer: int, n: int) -> None:
    for i in range(n):
        store.register(Path(home), {"round_id": f"w{writer}-{i:02d}", "promoted": i % 2 == 0})


def test_registry_keeps_every_entry_under_concurrent_writers(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_register_many, args=(str(tmp_path), w, 20)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ids = [e["round_id"] for e in store.list_entries(tmp_path)]
    assert sorted(ids) == sorted(f"w{w}-{i:02d}" for w in range(2) for i in range(20))
    # Each writer's entries keep their own order.
    for w in range(2):
        assert [i for i in ids if i.startswith(f"w{w}-")] == [f"w{w}-{i:02d}" for i in range(20)]

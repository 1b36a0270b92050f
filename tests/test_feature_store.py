"""The feature store's SQLite layout: new stores are a rowid table with its key index and 16 KB
pages; stores made before (a WITHOUT ROWID table) keep working as they are."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from stackvision.cache import PAGE_SIZE, FeatureStore

OLD_TABLE = (
    "CREATE TABLE features (image TEXT NOT NULL, view TEXT NOT NULL, vec BLOB NOT NULL,"
    " PRIMARY KEY (image, view)) WITHOUT ROWID"
)


def _old_store(path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(OLD_TABLE)


def test_a_new_store_is_a_rowid_table_with_16_kb_pages(tmp_path):
    store = FeatureStore(str(tmp_path / "s.sqlite"), 4)
    sql = store._db.execute("SELECT sql FROM sqlite_master WHERE name='features'").fetchone()[0]
    assert "WITHOUT ROWID" not in sql and "PRIMARY KEY (image, view)" in sql
    assert store._db.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE == 16384
    store.close()


@pytest.mark.parametrize("layout", ["new", "old"])
def test_both_layouts_store_look_up_and_read_the_same_rows(tmp_path, layout):
    path = str(tmp_path / "s.sqlite")
    if layout == "old":
        _old_store(path)
    store = FeatureStore(path, 4)
    if layout == "old":  # opening an old store leaves its table as it was
        sql = store._db.execute("SELECT sql FROM sqlite_master WHERE name='features'").fetchone()
        assert "WITHOUT ROWID" in sql[0]
    a, b = np.arange(4, dtype=np.float32), np.ones(4, np.float32)
    store.put_many([("h1", "orig", a), ("h1", "flip", b), ("h2", "orig", b)])
    store.put_many([("h2", "orig", a)])  # replaced, not duplicated
    store._db.execute("INSERT INTO features VALUES ('h3', 'orig', ?)", (b"\0" * 8,))  # 2 floats
    assert len(store) == 4
    assert store.missing(["h1", "h2", "h3", "h4", "h1"], "orig") == {"h3", "h4"}
    assert store.missing(["h1", "h2"], "flip") == {"h2"}
    got = store.get_many(["h1", "h2", "h3"], "orig")
    assert set(got) == {"h1", "h2"}  # the foreign-sized row is missing to both
    np.testing.assert_array_equal(got["h1"], a)
    np.testing.assert_array_equal(got["h2"], a)
    many = [f"x{i}" for i in range(1200)]  # more than one chunk of bound parameters
    store.put_many([(h, "orig", a) for h in many[::2]])
    assert store.missing(many, "orig") == set(many[1::2])
    store.close()

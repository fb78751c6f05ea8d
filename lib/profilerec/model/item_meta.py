"""Brand, categories and title of each item row, and the rows a brand/category filter allows.

A million items' metadata as Python strings and lists costs hundreds of MB in every process that
serves them. Here it stays in Arrow columns (which shared_index maps from one node-shared file),
and items added or changed while serving go in a small overlay of Python values on top. The
brand and category lookups of the filters are made once from the columns with Arrow kernels and
corrected by the overlay, so an upsert does not rebuild them.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

META_SCHEMA = pa.schema([("brand", pa.string()), ("categories", pa.list_(pa.string())), ("title", pa.string())])
EMPTY_ROWS = np.zeros(0, dtype=np.int64)


def meta_table(brands: Sequence[Optional[str]], categories: Sequence[Optional[Sequence[str]]],
               titles: Sequence[Optional[str]]) -> pa.Table:
    """The metadata columns (META_SCHEMA) of items given as Python values or Arrow arrays."""
    columns = [pa.array(c, t) if not isinstance(c, (pa.Array, pa.ChunkedArray)) else c.cast(t)
               for c, t in zip((brands, categories, titles), META_SCHEMA.types)]
    if columns[1].null_count:  # only then: a mapped column stays the map, not a copy
        columns[1] = pc.fill_null(columns[1], pa.scalar([], META_SCHEMA.field("categories").type))
    return pa.Table.from_arrays(columns, schema=META_SCHEMA)


class ItemMeta:
    """Per-row brand, categories and title: Arrow columns plus the rows changed or added since."""

    def __init__(self, base: pa.Table):
        self.base = base
        self.changed: dict[int, tuple[Optional[str], list[str], Optional[str]]] = {}
        self._rows = len(base)
        self._brand_rows: Optional[dict[str, np.ndarray]] = None  # made on the first filter
        self._category_rows: Optional[dict[str, np.ndarray]] = None
        self._brand_codes: Optional[np.ndarray] = None  # made on first use, dropped by a change

    def __len__(self) -> int:
        return self._rows

    def get(self, row: int) -> dict[str, Any]:
        """{"brand", "categories", "title"} of `row`."""
        if row in self.changed:
            brand, categories, title = self.changed[row]
            return {"brand": brand, "categories": list(categories), "title": title}
        return {"brand": self.base["brand"][row].as_py(), "categories": self.base["categories"][row].as_py() or [],
                "title": self.base["title"][row].as_py()}

    def title(self, row: int) -> Optional[str]:
        """The title of `row`."""
        return self.changed[row][2] if row in self.changed else self.base["title"][row].as_py()

    def set(self, row: int, brand: Optional[str], categories: Optional[Sequence[str]], title: Optional[str]) -> None:
        """Give `row` new values; `row == len(self)` adds a row."""
        if row > self._rows:
            raise IndexError(f"row {row} would leave a gap after {self._rows} rows")
        self.changed[row] = (brand, list(categories or []), title)
        self._rows = max(self._rows, row + 1)
        self._brand_codes = None

    def brand_codes(self) -> np.ndarray:
        """[rows] one number per distinct brand (compared case-insensitively), -1 for none: for
        comparing the brands of many rows at once. Kept until a row changes."""
        if self._brand_codes is None:
            column = self.base["brand"]
            column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
            encoded = pc.dictionary_encode(pc.utf8_lower(column))
            codes = np.full(self._rows, -1, dtype=np.int64)
            codes[:len(column)] = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
            numbers = {value: i for i, value in enumerate(encoded.dictionary.to_pylist())}
            for row, (brand, _, _) in self.changed.items():
                codes[row] = -1 if brand is None else numbers.setdefault(brand.lower(), len(numbers))
            if "" in numbers:  # a blank brand is no brand
                codes[codes == numbers[""]] = -1
            self._brand_codes = codes
        return self._brand_codes

    def rows_with(self, brand: Optional[str] = None, category: Optional[str] = None) -> Optional[np.ndarray]:
        """Sorted rows whose brand is `brand` and whose categories include `category`
        (case-insensitive); None when neither is given."""
        if brand is None and category is None:
            return None
        if self._brand_rows is None:
            self._brand_rows = _rows_by_value(self.base["brand"])
            self._category_rows = _rows_by_value(self.base["categories"])
        found = []
        if brand is not None:
            found.append(self._with_overlay(self._brand_rows, brand.casefold(), "brand"))
        if category is not None:
            found.append(self._with_overlay(self._category_rows, category.casefold(), "categories"))
        return found[0] if len(found) == 1 else np.intersect1d(*found, assume_unique=True)

    def _with_overlay(self, lookup: dict[str, np.ndarray], value: str, field: str) -> np.ndarray:
        """The base rows whose `field` has `value`, less the changed rows, plus the changed rows
        whose `field` has it."""
        rows = lookup.get(value, EMPTY_ROWS)
        if not self.changed:
            return rows
        changed = np.fromiter(self.changed, dtype=np.int64, count=len(self.changed))
        matching = [row for row, (brand, categories, _) in self.changed.items()
                    if any(v is not None and v.casefold() == value
                           for v in ([brand] if field == "brand" else categories))]
        kept = rows[~np.isin(rows, changed)]
        return np.union1d(kept, np.asarray(matching, dtype=np.int64))


def _rows_by_value(column: pa.ChunkedArray) -> dict[str, np.ndarray]:
    """casefolded value -> sorted rows having it, for a string column or a list<string> column;
    vectorised, with Python only for the distinct values."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_list(column.type):
        owners = pc.list_parent_indices(column).to_numpy()
        column = pc.list_flatten(column)
    else:
        owners = np.arange(len(column), dtype=np.int64)
    encoded = pc.dictionary_encode(column)
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    valid = ~np.asarray(pc.is_null(encoded.indices), dtype=bool)
    codes, owners = codes[valid].astype(np.int64), owners[valid].astype(np.int64)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(encoded.dictionary) + 1))
    grouped: dict[str, list[np.ndarray]] = {}
    for code, value in enumerate(encoded.dictionary.to_pylist()):
        grouped.setdefault(value.casefold(), []).append(owners[order[bounds[code]:bounds[code + 1]]])
    return {value: np.unique(np.concatenate(parts)) for value, parts in grouped.items()}

"""Writes shop.csv, the quickstart's example log: a shop's purchases (`customer_id,product_sku,ts`,
string ids, ISO times), not MovieLens-shaped. Synthetic, seeded: 600 customers in 8 groups of
taste, 240 products, each group buying mostly from its own 30 products; 2023-2024.

    python docs/examples/make_shop.py docs/examples/shop.csv
"""

import sys

import numpy as np
import pandas as pd


def make(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n_customers, n_products, n_groups = 600, 240, 8
    per_group = n_products // n_groups
    start = pd.Timestamp("2023-01-01")
    rows = []
    for c in range(n_customers):
        group = rng.integers(n_groups)
        n = int(rng.integers(4, 40))
        own = group * per_group + rng.zipf(1.6, size=n) % per_group  # a few favourites per group
        other = rng.integers(n_products, size=n)
        products = np.where(rng.random(n) < 0.8, own, other)
        days = np.sort(rng.integers(0, 730, size=n))
        for p, d in zip(products, days):
            rows.append((f"C{c:05d}", f"SKU-{p:04d}", (start + pd.Timedelta(days=int(d))).date().isoformat()))
    return pd.DataFrame(rows, columns=["customer_id", "product_sku", "ts"]).drop_duplicates(["customer_id", "product_sku"])


if __name__ == "__main__":
    make().to_csv(sys.argv[1] if len(sys.argv) > 1 else "shop.csv", index=False)

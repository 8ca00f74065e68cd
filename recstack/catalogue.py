"""What may be recommended: the one list of service lines, which are sold on invoices but are not goods.

Online Retail books postage, carriage, fees, discounts, manual adjustments, samples and gift
vouchers as invoice lines with stock codes of their own. They are not products a shopper picks:
a recommender that learns them as goods puts ``POST`` (postage, on 1,130 of 20,728 invoices) first
for every customer who pays postage, and as evaluation targets they are easy hits that inflate
every model's figures. Each code below was checked against its descriptions in the data set;
codes that merely do not start with a digit can be goods (``PADS``, ``DCGS…``: cushion pads, party
bags, collars) and stay.

Used by the Online Retail mapping (:mod:`recstack.sources`, which drops these lines), by training
(each item of a model version carries a *recommendable* flag, :class:`models.vocab.ItemVocab`;
an item first seen live is judged here) and by the load tests' candidate items
(:mod:`loadtests.workload`).
"""

from __future__ import annotations

# Stock code -> its description in Online Retail.
SERVICE_LINES: dict[str, str] = {
    "POST": "POSTAGE",
    "DOT": "DOTCOM POSTAGE",
    "C2": "CARRIAGE",
    "23444": "Next Day Carriage",
    "23574": "PACKING CHARGE",
    "M": "Manual",
    "m": "Manual",
    "D": "Discount",
    "S": "SAMPLES",
    "B": "Adjust bad debt",
    "BANK CHARGES": "Bank Charges",
    "AMAZONFEE": "AMAZON FEE",
    "CRUK": "CRUK Commission",
    "22016": "Dotcomgiftshop Gift Voucher £100.00",
}
# Code prefixes of whole families of service lines: gift vouchers ``gift_0001_10`` .. ``_50``.
SERVICE_LINE_PREFIXES: tuple[str, ...] = ("gift_0001_",)


def is_service_line(item_id: str) -> bool:
    """Whether ``item_id`` is a service line (postage, a fee, a voucher...) rather than a good."""
    return item_id in SERVICE_LINES or item_id.startswith(SERVICE_LINE_PREFIXES)


def is_recommendable(item_id: str) -> bool:
    """Whether ``Recommend`` may offer ``item_id``: every item that is not a service line."""
    return not is_service_line(item_id)

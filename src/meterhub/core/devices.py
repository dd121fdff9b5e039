"""What the protocol service keeps in memory per device."""

from __future__ import annotations

from meterhub.model.datapoint import ProductModel


def _may_take(owner: int | None, vendor_id: int | None) -> bool:
    """Whether a gateway of vendor ``vendor_id`` may sync a device owned by ``owner`` (None: nobody
    yet, the first vendor to sync it takes it)."""
    return owner is None or owner == vendor_id


class DeviceState:
    """What the hot path needs to know about a device, kept in memory."""

    __slots__ = ("cid", "gateway_id", "last_heard", "model", "name", "online", "product_id", "vendor_id")

    def __init__(
        self,
        cid: str,
        gateway_id: str,
        product_id: str,
        model: ProductModel,
        online: bool,
        last_heard: float,
        name: str | None = None,
        vendor_id: int | None = None,
    ) -> None:
        self.cid = cid
        self.gateway_id = gateway_id
        self.product_id = product_id
        self.model = model
        self.online = online
        self.last_heard = last_heard
        self.name = name
        self.vendor_id = vendor_id  # the owning vendor: only its gateways may sync the device

"""Every carrier's edge, by `Carrier`: how the server and the call reach a call's carrier
without knowing which one it is."""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

from app.telephony.base import Edge
from app.telephony.carrier import Carrier
from app.telephony.carriers.plivo import PLIVO
from app.telephony.carriers.signalwire import SIGNALWIRE
from app.telephony.carriers.telnyx import TELNYX
from app.telephony.carriers.twilio import TWILIO

__all__ = ["EDGES", "edge"]

EDGES: Final = MappingProxyType(
    {edge.carrier: edge for edge in (TWILIO, TELNYX, PLIVO, SIGNALWIRE)}
)


def edge(carrier: Carrier) -> Edge:
    """The edge of `carrier`."""
    return EDGES[carrier]

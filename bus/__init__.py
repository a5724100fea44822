"""The message bus: one protocol, an in-memory backend and a NATS backend.

Import names from here; each lives in the module that owns it.
"""

from bus._subject import EncodedHeaders as EncodedHeaders
from bus._types import Bus as Bus
from bus._types import BusStatistics as BusStatistics
from bus._types import Envelope as Envelope
from bus._types import Subscription as Subscription
from bus._types import SubscriptionStatistics as SubscriptionStatistics
from bus.connect import connect as connect
from bus.errors import BusClosed as BusClosed
from bus.errors import BusConnectError as BusConnectError
from bus.errors import BusError as BusError
from bus.errors import InvalidHeader as InvalidHeader
from bus.errors import InvalidSubject as InvalidSubject
from bus.errors import JetStreamUnavailable as JetStreamUnavailable
from bus.errors import NoResponders as NoResponders
from bus.errors import PayloadTooLarge as PayloadTooLarge
from bus.errors import PermissionDenied as PermissionDenied
from bus.errors import RequestTimeout as RequestTimeout
from bus.errors import SlowConsumer as SlowConsumer
from bus.memory import open_memory_bus as open_memory_bus
from bus.nats import open_nats_bus as open_nats_bus
from bus.server import NatsServer as NatsServer

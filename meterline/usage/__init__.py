"""Usage events: the wire message, its validation, and provider adapters."""

from meterline.usage.validation import InvalidEvent, UsageRecord, decode, validate
from meterline.v1.usage_pb2 import RequestStatus, UsageEvent

__all__ = ["InvalidEvent", "RequestStatus", "UsageEvent", "UsageRecord", "decode", "validate"]

"""Errors a user can act on. Their messages name the setting, file or field and say what is wrong."""


class ProfilerecError(Exception):
    """Base class: an error whose message is written for the person running the job."""


class ConfigError(ProfilerecError):
    """A setting is unknown, missing or of the wrong type."""


class DataError(ProfilerecError):
    """An input file is missing, unreadable or not in the expected format."""


class ValidationError(ProfilerecError):
    """Incoming events or items break the canonical schema (field named in the message)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class ShardRetired(ProfilerecError):
    """A profile shard stopped taking writes because the service is being re-partitioned; the
    same request, retried, reaches the new shards (event ids make the retry safe)."""


class StorageUnavailable(ProfilerecError):
    """The service's durable state cannot be written (a full disk, an I/O error): the request was
    refused whole, nothing of it is acknowledged, and the same request can be retried later."""

"""C2SP tlog checkpoints (https://c2sp.org/tlog-checkpoint): a signed tree head as a note.

Text: the origin line, the tree size in decimal, the base64 root hash, then optional non-empty
extension lines; signed as a signed note whose key name is the origin.
"""

from __future__ import annotations

from dataclasses import dataclass

from lukhas.transparency.errors import MalformedCheckpoint
from lukhas.transparency.merkle import HASH_SIZE
from lukhas.transparency.note import Signer, Verifier, b64decode, b64encode, open_note, sign_note


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tree head: who issued it (`origin`), how many leaves, and their root hash."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or "\n" in self.origin:
            raise MalformedCheckpoint("the origin must be one non-empty line")
        if self.size < 0:
            raise MalformedCheckpoint("the tree size must be >= 0")
        if len(self.root_hash) != HASH_SIZE:
            raise MalformedCheckpoint(f"the root hash must be {HASH_SIZE} bytes")
        if any(not e or "\n" in e for e in self.extensions):
            raise MalformedCheckpoint("extension lines must be single non-empty lines")

    def text(self) -> str:
        """The checkpoint note text, ending in a newline."""
        lines = [self.origin, str(self.size), b64encode(self.root_hash), *self.extensions]
        return "".join(f"{line}\n" for line in lines)

    def sign(self, signer: Signer) -> bytes:
        """The signed checkpoint note."""
        return sign_note(self.text(), signer)


def parse_checkpoint(text: str) -> Checkpoint:
    """Read a checkpoint note text (without signatures).

    Raises:
        MalformedCheckpoint: it does not follow the tlog-checkpoint format.
    """
    if not text.endswith("\n"):
        raise MalformedCheckpoint("the checkpoint text must end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise MalformedCheckpoint("a checkpoint has an origin, a size and a root hash line")
    origin, size_line, root_line, *extensions = lines
    if not origin:
        raise MalformedCheckpoint("the origin line is empty")
    if not size_line.isascii() or not size_line.isdigit() or (
        size_line != "0" and size_line.startswith("0")
    ):
        raise MalformedCheckpoint(f"tree size {size_line[:30]!r} is not a decimal number")
    try:
        root = b64decode(root_line)
    except ValueError:
        raise MalformedCheckpoint("the root hash line is not base64") from None
    if len(root) != HASH_SIZE:
        raise MalformedCheckpoint(f"the root hash is {len(root)} bytes, not {HASH_SIZE}")
    if any(not e for e in extensions):
        raise MalformedCheckpoint("extension lines must be non-empty")
    return Checkpoint(origin, int(size_line), root, tuple(extensions))


def open_checkpoint(note: bytes, verifier: Verifier, *, origin: str | None = None) -> Checkpoint:
    """Verify a signed checkpoint with the log's key and return it.

    The origin must be `origin` (default: the key's name, as the log signs with its origin).

    Raises:
        MalformedNote, InvalidSignature, UnverifiedNote: the note's signature does not hold.
        MalformedCheckpoint: the text is not a checkpoint, or is from another log.
    """
    opened = open_note(note, [verifier])
    checkpoint = parse_checkpoint(opened.text)
    want = verifier.name if origin is None else origin
    if checkpoint.origin != want:
        raise MalformedCheckpoint(
            f"the checkpoint is for log {checkpoint.origin!r}, not {want!r}"
        )
    return checkpoint

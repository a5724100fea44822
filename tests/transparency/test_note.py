"""C2SP signed notes and checkpoints against published vectors.

Vectors: golang.org/x/mod/sumdb/note/note_test.go (github.com/golang/mod at commit
fe2ec04f7c3c3aa6fad97631aafcff6e49e2d1db: the PeterNeumann and EnochRoot keys and signatures)
and the example in c2sp.org/signed-note (github.com/C2SP/C2SP signed-note.md at commit
5ba5ee830903e91240fc6f9f3a7a9293d49e69c9: example.com/foo).
"""

from __future__ import annotations

import pytest

from lukhas.transparency.checkpoint import Checkpoint, open_checkpoint, parse_checkpoint
from lukhas.transparency.errors import (
    InvalidSignature,
    MalformedCheckpoint,
    MalformedKey,
    MalformedNote,
    UnverifiedNote,
)
from lukhas.transparency.merkle import EMPTY_ROOT, leaf_hash
from lukhas.transparency.note import Signer, Verifier, open_note, sign_note

PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = (
    "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZ"
    "b6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    "— EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33"
    "WWd1RvMc+QQ=\n"
)
C2SP_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
C2SP_NOTE = (
    "This is an example message.\n\n— example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONn"
    "cAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"
).encode()


def test_go_signer_and_verifier_keys() -> None:
    signer = Signer.parse(PETER_SKEY)
    assert str(signer.verifier) == PETER_VKEY
    assert str(Verifier.parse(PETER_VKEY)) == PETER_VKEY
    assert signer.private_key_string() == PETER_SKEY
    assert f"{signer.key_id:08x}" == "c74f20a3"
    assert "AYEK" not in repr(signer)


def test_go_sign_known_answer() -> None:
    assert sign_note(TEXT, Signer.parse(PETER_SKEY)) == (TEXT + "\n" + PETER_SIG).encode()


def test_go_open_known_answers() -> None:
    peter, enoch = Verifier.parse(PETER_VKEY), Verifier.parse(ENOCH_VKEY)
    msg = (TEXT + "\n" + PETER_SIG + ENOCH_SIG).encode()
    note = open_note(msg, [peter])
    assert note.text == TEXT
    assert [s.name for s in note.signatures] == ["PeterNeumann"]
    assert [s.name for s in note.unverified] == ["EnochRoot"]
    both = open_note(msg, [peter, enoch])
    assert [s.name for s in both.signatures] == ["PeterNeumann", "EnochRoot"]
    with pytest.raises(UnverifiedNote):
        open_note(msg, [])
    # Invalid signature: the Go test inserts "ABCD" at byte 60 of Peter's line.
    broken = TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    with pytest.raises(InvalidSignature, match="PeterNeumann"):
        open_note(broken.encode(), [peter])


@pytest.mark.parametrize("msg", [
    TEXT,
    TEXT + "\n",
    TEXT + "\n" + PETER_SIG[:-1],
    "\x01" + TEXT + "\n" + PETER_SIG,
    TEXT + "\n" + "— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfq"
    "dngotpRZb6KE6RyyBwJnAM=",
    TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
    TEXT + "\n" + PETER_SIG * 101,
])
def test_go_malformed_notes(msg: str) -> None:
    with pytest.raises(MalformedNote):
        open_note(msg.encode(), [Verifier.parse(PETER_VKEY)])


def test_not_utf8_is_malformed() -> None:
    with pytest.raises(MalformedNote):
        open_note(b"\xff" + (TEXT + "\n" + PETER_SIG).encode(), [Verifier.parse(PETER_VKEY)])


def test_c2sp_example_verifies() -> None:
    note = open_note(C2SP_NOTE, [Verifier.parse(C2SP_VKEY)])
    assert note.text == "This is an example message.\n"
    with pytest.raises(InvalidSignature):
        open_note(C2SP_NOTE.replace(b"example message", b"example massage"),
                  [Verifier.parse(C2SP_VKEY)])


def test_go_key_manglings_refused() -> None:
    # As TestNewVerifier / TestNewSigner: every proper substring and every byte+1 is refused.
    for key, parse in ((PETER_VKEY, Verifier.parse), (PETER_SKEY, Signer.parse)):
        for i in range(len(key)):
            for j in range(i + 1, len(key) + 1):
                if (i, j) != (0, len(key)):
                    with pytest.raises(MalformedKey):
                        parse(key[i:j])
        for i in range(len(key)):
            mangled = key[:i] + chr(ord(key[i]) + 1) + key[i + 1:]
            with pytest.raises(MalformedKey):
                parse(mangled)
    # Wrong key length and unknown algorithm, each with an adjusted key hash.
    for bad in ("PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
                "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"):
        with pytest.raises(MalformedKey):
            Verifier.parse(bad)


def test_generated_key_round_trip() -> None:
    signer = Signer.generate("example.com/log")
    again = Signer.parse(signer.private_key_string())
    assert again.verifier == signer.verifier == Verifier.parse(str(signer.verifier))
    note = sign_note("hello\n", signer)
    assert open_note(note, [signer.verifier]).text == "hello\n"
    other = Signer.generate("example.com/log")  # same name, other key: ignored, so unverified
    with pytest.raises(UnverifiedNote):
        open_note(note, [other.verifier])


C2SP_CHECKPOINT = (
    "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
)


def test_checkpoint_spec_example_parses() -> None:
    cp = parse_checkpoint(C2SP_CHECKPOINT)
    assert (cp.origin, cp.size, len(cp.root_hash)) == ("example.com/behind-the-sofa", 20852163, 32)
    assert cp.text() == C2SP_CHECKPOINT


@pytest.mark.parametrize("text", [
    "origin\n1\n",
    "\n1\n" + "A" * 43 + "=\n",
    "origin\n01\n" + "A" * 43 + "=\n",
    "origin\n-1\n" + "A" * 43 + "=\n",
    "origin\n1\nAAAA\n",
    "origin\n1\n" + "A" * 43 + "=\n\n",
    "origin\n1\n" + "A" * 43 + "=",
    "origin\n１\n" + "A" * 43 + "=\n",
])
def test_malformed_checkpoints(text: str) -> None:
    with pytest.raises(MalformedCheckpoint):
        parse_checkpoint(text)


def test_signed_checkpoint_round_trip_and_origin() -> None:
    signer = Signer.generate("example.com/consent")
    cp = Checkpoint("example.com/consent", 1, leaf_hash(b"x"), ("ext one",))
    assert open_checkpoint(cp.sign(signer), signer.verifier) == cp
    foreign = Checkpoint("example.com/other", 0, EMPTY_ROOT)
    with pytest.raises(MalformedCheckpoint, match="other"):
        open_checkpoint(foreign.sign(signer), signer.verifier)
    tampered = cp.sign(signer).replace(b"\n1\n", b"\n2\n")
    with pytest.raises(InvalidSignature):
        open_checkpoint(tampered, signer.verifier)

"""Write the golden frames (NAME.msgpack, NAME.json) of every case in messages.json with the Python codec.

    .venv/bin/python -m tests.golden.make_golden

Only for a deliberate wire-format change: the golden tests exist to notice accidental ones.
"""

from __future__ import annotations

from realtime.protocol import Encoding, encode
from tests.golden import GOLDEN_DIR, load_cases


def main() -> None:
    cases = load_cases()
    names = {c.name for c in cases}
    for stale in [*GOLDEN_DIR.glob("*.msgpack"), *GOLDEN_DIR.glob("*.json")]:
        if stale.stem not in names and stale.name != "messages.json":
            stale.unlink()
    for case in cases:
        msg = case.typed()
        binary = encode(msg, Encoding.MSGPACK)
        text = encode(msg, Encoding.JSON)
        assert isinstance(binary, bytes) and isinstance(text, str)
        case.msgpack_path.write_bytes(binary)
        case.json_path.write_bytes(text.encode("utf-8"))  # no trailing newline: the file is the frame
    print(f"wrote {len(cases)} golden cases to {GOLDEN_DIR}")


if __name__ == "__main__":
    main()

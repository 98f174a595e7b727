#!/usr/bin/env python3
"""Independent check of keys/testdata/vectors-v2.json (docs/keys.md §10).

Rebuilds every vector from its inputs with Python's `cryptography` (X25519, RFC 5869 HKDF)
and the standard library, without the Go code: public keys from the test scalars, the
shared secret from both sides, the info bytes from the fields, the SPI from the layout.
Prints "N vectors match" or exits 1 naming the first field that differs.
"""
import ipaddress
import json
import struct
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
import hmac
import hashlib

CIPHER_ID = {"aes128gcm": 1, "aes256gcm": 2}
KEY_BYTES = {"aes128gcm": 16, "aes256gcm": 32}


def pub(priv):
    return priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def ip16(s):
    a = ipaddress.ip_address(s)
    if a.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + a.packed
    return a.packed


def lp(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def main(path):
    vs = json.load(open(path))
    for i, v in enumerate(vs):
        sp = X25519PrivateKey.from_private_bytes(bytes.fromhex(v["srcPrivateHex"]))
        dp = X25519PrivateKey.from_private_bytes(bytes.fromhex(v["dstPrivateHex"]))
        spub, dpub = pub(sp), pub(dp)
        shared = sp.exchange(X25519PublicKey.from_public_bytes(dpub))
        if shared != dp.exchange(X25519PublicKey.from_public_bytes(spub)):
            sys.exit(f"vector {i}: the two ends' shared secrets differ")
        tunnel = v.get("kind") == "tunnel"
        label = b"secureoverlay esp tunnel sa v2" if tunnel else b"secureoverlay esp sa v2"
        info = (label + b"\x00" + bytes([CIPHER_ID[v["cipher"]], v["icvBytes"]])
                + struct.pack(">IH", v["generation"], v["lane"])
                + ip16(v["srcIP"]) + ip16(v["dstIP"]) + spub + dpub
                + lp(v["srcIncarnation"]) + lp(v["dstIncarnation"]))
        salt = bytes.fromhex(v["saltHex"])
        prk = hmac.new(salt, shared, hashlib.sha256).digest()  # RFC 5869 extract
        okm = HKDFExpand(hashes.SHA256(), KEY_BYTES[v["cipher"]] + 4, info).derive(prk)
        spi = (v["generation"] % 4) << 30 | v["srcNodeID"] << 8 | v["lane"] << 1 | (1 if tunnel else 0)
        for name, want, got in [("srcPublicHex", v["srcPublicHex"], spub.hex()),
                                ("dstPublicHex", v["dstPublicHex"], dpub.hex()),
                                ("infoHex", v["infoHex"], info.hex()),
                                ("spi", v["spi"], "0x%08x" % spi),
                                ("keyHex", v["keyHex"], okm.hex())]:
            if want != got:
                sys.exit(f"vector {i}: {name} differs: file {want}, recomputed {got}")
    print(f"{len(vs)} vectors match")


if __name__ == "__main__":
    main(sys.argv[1])

"""A second, independent ELF64 reader for the tests, so that what ember's export check reads out of a library
(ember.compiler.rocm_aot) is confirmed by code that shares nothing with it; plus which system tools exist."""

import shutil
import struct


def header(data: bytes) -> dict:
    assert data[:4] == b"\x7fELF", "not an ELF file"
    assert data[4] == 2 and data[5] == 1, "not a little-endian ELF64 file"
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    e_flags, = struct.unpack_from("<I", data, 48)
    return {"os_abi": data[7], "abi_version": data[8], "type": e_type, "machine": e_machine, "flags": e_flags}


def sections(data: bytes) -> list[dict]:
    shoff, = struct.unpack_from("<Q", data, 40)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 58)
    out = []
    for i in range(shnum):
        name, typ, _flags, addr, offset, size, link, _info, _align, entsize = struct.unpack_from(
            "<IIQQQQIIQQ", data, shoff + i * shentsize)
        out.append({"name_off": name, "type": typ, "addr": addr, "offset": offset, "size": size, "link": link,
                    "entsize": entsize})
    strtab = out[shstrndx]["offset"]
    for s in out:
        s["name"] = data[strtab + s["name_off"]:data.index(b"\0", strtab + s["name_off"])].decode()
    return out


def defined_symbols(data: bytes) -> set[str]:
    secs = sections(data)
    names = set()
    for s in secs:
        if s["type"] not in (2, 11) or not s["entsize"]:  # SHT_SYMTAB, SHT_DYNSYM
            continue
        strs = secs[s["link"]]["offset"]
        for i in range(1, s["size"] // s["entsize"]):
            st_name, _info, _other, shndx = struct.unpack_from("<IBBH", data, s["offset"] + i * s["entsize"])
            if shndx != 0 and st_name:
                names.add(data[strs + st_name:data.index(b"\0", strs + st_name)].decode())
    return names


def notes(data: bytes) -> list[tuple[str, int, bytes]]:
    """(owner, type, descriptor) of every note in SHT_NOTE sections."""
    out = []
    for s in sections(data):
        if s["type"] != 7:
            continue
        p, end = s["offset"], s["offset"] + s["size"]
        while p + 12 <= end:
            namesz, descsz, typ = struct.unpack_from("<III", data, p)
            p += 12
            owner = data[p:p + namesz].rstrip(b"\0").decode()
            p += (namesz + 3) & ~3
            out.append((owner, typ, data[p:p + descsz]))
            p += (descsz + 3) & ~3
    return out


def tool(*names):
    """The first of ``names`` on PATH, or None."""
    for n in names:
        path = shutil.which(n)
        if path:
            return path
    return None

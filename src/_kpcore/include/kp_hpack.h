/* HPACK (RFC 7541): header block decoding with the dynamic table and Huffman strings, and the few
 * encodings the server's responses need (indexed and literal-without-indexing fields, no Huffman).
 *
 * The Huffman code of Appendix B is canonical: codes of one length are consecutive integers, assigned in
 * symbol order, each length starting where the previous one ended (shifted). So the table below holds only
 * the code length of each symbol (0-255, then EOS = 256) and the codes are derived from it once
 * (kp_huff_init); the derivation checks that the lengths form a complete code (Kraft sum exactly 1).
 */
#ifndef KP_HPACK_H
#define KP_HPACK_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Code length in bits of each symbol, RFC 7541 Appendix B; index 256 is EOS. */
static const uint8_t kp_huff_len[257] = {
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, /*   0- 15 */
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, /*  16- 31 */
    6,  10, 10, 12, 13, 6,  8,  11, 10, 10, 8,  11, 8,  6,  6,  6,  /*  ' '-'/' */
    5,  5,  5,  6,  6,  6,  6,  6,  6,  6,  7,  8,  15, 6,  12, 10, /*  '0'-'?' */
    13, 6,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  /*  '@'-'O' */
    7,  7,  7,  7,  7,  7,  7,  7,  8,  7,  8,  13, 19, 13, 14, 6,  /*  'P'-'_' */
    15, 5,  6,  5,  6,  5,  6,  6,  6,  5,  7,  7,  6,  6,  6,  5,  /*  '`'-'o' */
    6,  7,  6,  5,  5,  6,  7,  7,  7,  7,  7,  15, 11, 14, 13, 28, /*  'p'-127 */
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, /* 128-143 */
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, /* 144-159 */
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, /* 160-175 */
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, /* 176-191 */
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, /* 192-207 */
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, /* 208-223 */
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, /* 224-239 */
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, /* 240-255 */
    30,                                                             /* EOS */
};

#define KP_HUFF_MAXLEN 30

/* Canonical decoding tables: for each length L, the first code of that length, how many codes have it,
 * and where its symbols start in kp_huff_sorted (symbols ordered by (length, value)). */
typedef struct {
    uint32_t first[KP_HUFF_MAXLEN + 1];
    uint32_t count[KP_HUFF_MAXLEN + 1];
    uint32_t offset[KP_HUFF_MAXLEN + 1];
    uint16_t sorted[257];
    uint32_t code[257]; /* each symbol's code, right-aligned (for tests and checks) */
    int ready;
} kp_huff_tables;

static kp_huff_tables kp_huff;

/* Returns 0, or -1 when the length table is not a complete prefix code. Idempotent; call before use
 * (kp_h2 calls it when a server is created, before any thread runs). */
static int kp_huff_init(void) {
    if (kp_huff.ready) return 0;
    memset(&kp_huff, 0, sizeof(kp_huff));
    for (int s = 0; s < 257; s++) kp_huff.count[kp_huff_len[s]]++;
    uint32_t code = 0, pos = 0;
    uint64_t kraft = 0; /* sum of 2^(30 - L): exactly 2^30 for a complete code */
    for (int len = 1; len <= KP_HUFF_MAXLEN; len++) {
        code <<= 1;
        kp_huff.first[len] = code;
        kp_huff.offset[len] = pos;
        for (int s = 0; s < 257; s++)
            if (kp_huff_len[s] == len) {
                kp_huff.sorted[pos++] = (uint16_t)s;
                kp_huff.code[s] = code++;
                kraft += (uint64_t)1 << (KP_HUFF_MAXLEN - len);
            }
    }
    if (kraft != ((uint64_t)1 << KP_HUFF_MAXLEN) || pos != 257) return -1;
    kp_huff.ready = 1;
    return 0;
}

/* Decode n Huffman-coded bytes into out (capacity cap). Returns the decoded length, or -1 on a coding
 * error: EOS inside the string, padding longer than 7 bits or not all ones (RFC 7541 5.2), or more
 * output than cap. */
static long kp_huff_decode(const uint8_t *in, size_t n, uint8_t *out, size_t cap) {
    size_t o = 0;
    uint32_t code = 0;
    int len = 0;
    int ones = 1; /* the bits read since the last symbol are all ones */
    for (size_t i = 0; i < n; i++) {
        for (int b = 7; b >= 0; b--) {
            uint32_t bit = (in[i] >> b) & 1u;
            code = (code << 1) | bit;
            len++;
            ones &= (int)bit;
            if (len > KP_HUFF_MAXLEN) return -1;
            if (kp_huff.count[len] && code - kp_huff.first[len] < kp_huff.count[len] && code >= kp_huff.first[len]) {
                uint16_t sym = kp_huff.sorted[kp_huff.offset[len] + (code - kp_huff.first[len])];
                if (sym == 256) return -1; /* EOS must not appear in a string */
                if (o >= cap) return -1;
                out[o++] = (uint8_t)sym;
                code = 0;
                len = 0;
                ones = 1;
            }
        }
    }
    if (len > 7 || !ones) return -1;
    return (long)o;
}

/* ---------------------------------------------------------------------------------------------------- */
/* static table (Appendix A) */

typedef struct {
    const char *name;
    const char *value;
} kp_hpack_static_entry;

static const kp_hpack_static_entry kp_hpack_static[61] = {
    {":authority", ""}, {":method", "GET"}, {":method", "POST"}, {":path", "/"}, {":path", "/index.html"},
    {":scheme", "http"}, {":scheme", "https"}, {":status", "200"}, {":status", "204"}, {":status", "206"},
    {":status", "304"}, {":status", "400"}, {":status", "404"}, {":status", "500"}, {"accept-charset", ""},
    {"accept-encoding", "gzip, deflate"}, {"accept-language", ""}, {"accept-ranges", ""}, {"accept", ""},
    {"access-control-allow-origin", ""}, {"age", ""}, {"allow", ""}, {"authorization", ""},
    {"cache-control", ""}, {"content-disposition", ""}, {"content-encoding", ""}, {"content-language", ""},
    {"content-length", ""}, {"content-location", ""}, {"content-range", ""}, {"content-type", ""},
    {"cookie", ""}, {"date", ""}, {"etag", ""}, {"expect", ""}, {"expires", ""}, {"from", ""},
    {"host", ""}, {"if-match", ""}, {"if-modified-since", ""}, {"if-none-match", ""}, {"if-range", ""},
    {"if-unmodified-since", ""}, {"last-modified", ""}, {"link", ""}, {"location", ""},
    {"max-forwards", ""}, {"proxy-authenticate", ""}, {"proxy-authorization", ""}, {"range", ""},
    {"referer", ""}, {"refresh", ""}, {"retry-after", ""}, {"server", ""}, {"set-cookie", ""},
    {"strict-transport-security", ""}, {"transfer-encoding", ""}, {"user-agent", ""}, {"vary", ""},
    {"via", ""}, {"www-authenticate", ""},
};

/* ---------------------------------------------------------------------------------------------------- */
/* dynamic table: a ring of entries, newest at index 62 */

#define KP_HPACK_TABLE_SIZE 4096u /* SETTINGS_HEADER_TABLE_SIZE we accept (the protocol default) */
#define KP_HPACK_MAX_ENTRIES (KP_HPACK_TABLE_SIZE / 32u) /* every entry costs at least 32 */

typedef struct {
    char *buf; /* name then value, one allocation */
    uint32_t nlen, vlen;
} kp_hpack_entry;

typedef struct {
    kp_hpack_entry e[KP_HPACK_MAX_ENTRIES];
    uint32_t head;  /* slot of the newest entry */
    uint32_t count;
    uint32_t size;  /* sum of 32 + nlen + vlen */
    uint32_t max;   /* current maximum (size updates from the peer, at most KP_HPACK_TABLE_SIZE) */
} kp_hpack_table;

static void kp_hpack_table_init(kp_hpack_table *t) {
    memset(t, 0, sizeof(*t));
    t->max = KP_HPACK_TABLE_SIZE;
}

static void kp_hpack_evict_one(kp_hpack_table *t) {
    uint32_t oldest = (t->head + KP_HPACK_MAX_ENTRIES - (t->count - 1)) % KP_HPACK_MAX_ENTRIES;
    kp_hpack_entry *e = &t->e[oldest];
    t->size -= 32 + e->nlen + e->vlen;
    free(e->buf);
    e->buf = NULL;
    t->count--;
}

static void kp_hpack_table_free(kp_hpack_table *t) {
    while (t->count) kp_hpack_evict_one(t);
}

static void kp_hpack_shrink(kp_hpack_table *t, uint32_t max) {
    while (t->count && t->size > max) kp_hpack_evict_one(t);
}

/* Add an entry (RFC 7541 4.4: evict until it fits; an entry larger than the table empties it). */
static int kp_hpack_add(kp_hpack_table *t, const char *name, uint32_t nlen, const char *value, uint32_t vlen) {
    uint64_t need = 32ull + nlen + vlen;
    if (need > t->max) {
        kp_hpack_shrink(t, 0);
        return 0;
    }
    kp_hpack_shrink(t, (uint32_t)(t->max - need));
    char *buf = (char *)malloc((size_t)nlen + vlen + 1);
    if (!buf) return -1;
    memcpy(buf, name, nlen);
    memcpy(buf + nlen, value, vlen);
    t->head = t->count ? (t->head + 1) % KP_HPACK_MAX_ENTRIES : t->head;
    t->e[t->head].buf = buf;
    t->e[t->head].nlen = nlen;
    t->e[t->head].vlen = vlen;
    t->count++;
    t->size += (uint32_t)need;
    return 0;
}

/* Look up index i (1-based, static then dynamic). Returns 0, or -1 for an index out of range. */
static int kp_hpack_get(const kp_hpack_table *t, uint64_t i, const char **name, uint32_t *nlen,
                        const char **value, uint32_t *vlen) {
    if (i == 0) return -1;
    if (i <= 61) {
        *name = kp_hpack_static[i - 1].name;
        *nlen = (uint32_t)strlen(*name);
        *value = kp_hpack_static[i - 1].value;
        *vlen = (uint32_t)strlen(*value);
        return 0;
    }
    uint64_t d = i - 62;
    if (d >= t->count) return -1;
    const kp_hpack_entry *e = &t->e[(t->head + KP_HPACK_MAX_ENTRIES - (uint32_t)d) % KP_HPACK_MAX_ENTRIES];
    *name = e->buf;
    *nlen = e->nlen;
    *value = e->buf + e->nlen;
    *vlen = e->vlen;
    return 0;
}

/* ---------------------------------------------------------------------------------------------------- */
/* primitives */

/* Integer with an N-bit prefix (5.1). Returns 0, or -1 when truncated or larger than 2^28. */
static int kp_hpack_int(const uint8_t **pp, const uint8_t *end, int prefix, uint64_t *out) {
    const uint8_t *p = *pp;
    if (p >= end) return -1;
    uint64_t mask = (1u << prefix) - 1;
    uint64_t v = *p++ & mask;
    if (v == mask) {
        int shift = 0;
        for (;;) {
            if (p >= end || shift > 21) return -1;
            uint8_t b = *p++;
            v += (uint64_t)(b & 0x7f) << shift;
            shift += 7;
            if (!(b & 0x80)) break;
        }
        if (v > (1u << 28)) return -1;
    }
    *pp = p;
    *out = v;
    return 0;
}

/* A string literal (5.2), decoded into scratch space *sp (advanced; space up to send). */
static int kp_hpack_str(const uint8_t **pp, const uint8_t *end, char **sp, char *send, const char **out,
                        uint32_t *olen) {
    const uint8_t *p = *pp;
    if (p >= end) return -1;
    int huff = (*p & 0x80) != 0;
    uint64_t n;
    if (kp_hpack_int(&p, end, 7, &n) < 0) return -1;
    if (n > (uint64_t)(end - p)) return -1;
    char *s = *sp;
    if (huff) {
        long m = kp_huff_decode(p, (size_t)n, (uint8_t *)s, (size_t)(send - s));
        if (m < 0) return -1;
        *olen = (uint32_t)m;
    } else {
        if (n > (uint64_t)(send - s)) return -1;
        memcpy(s, p, (size_t)n);
        *olen = (uint32_t)n;
    }
    *out = s;
    *sp = s + *olen;
    *pp = p + n;
    return 0;
}

/* Called for each decoded field; returns 0 to go on, -1 to fail the block. */
typedef int (*kp_hpack_sink)(void *arg, const char *name, uint32_t nlen, const char *value, uint32_t vlen);

/* Decode one complete header block. Returns 0, -1 on a compression error (the connection must end:
 * the table is no longer in step with the peer's), -2 when the sink refused (out of memory). */
static int kp_hpack_decode(kp_hpack_table *t, const uint8_t *p, size_t n, kp_hpack_sink sink, void *arg) {
    const uint8_t *end = p + n;
    /* Decoded strings never exceed 8/5 of their coded size (the shortest code is 5 bits); a name taken
     * from the table is at most the table's size. */
    size_t scap = n * 8 / 5 + 16 + KP_HPACK_TABLE_SIZE;
    char *scratch = (char *)malloc(scap);
    if (!scratch) return -2;
    int rc = 0;
    while (p < end) {
        char *sp = scratch, *send = scratch + scap;
        uint8_t b = *p;
        const char *name = NULL, *value = NULL;
        uint32_t nlen = 0, vlen = 0;
        uint64_t idx;
        if (b & 0x80) { /* indexed field */
            if (kp_hpack_int(&p, end, 7, &idx) < 0 || kp_hpack_get(t, idx, &name, &nlen, &value, &vlen) < 0) {
                rc = -1;
                break;
            }
        } else if ((b & 0xe0) == 0x20) { /* dynamic table size update */
            if (kp_hpack_int(&p, end, 5, &idx) < 0 || idx > KP_HPACK_TABLE_SIZE) {
                rc = -1;
                break;
            }
            t->max = (uint32_t)idx;
            kp_hpack_shrink(t, t->max);
            continue;
        } else {
            int incremental = (b & 0xc0) == 0x40;
            int prefix = incremental ? 6 : 4;
            if (kp_hpack_int(&p, end, prefix, &idx) < 0) {
                rc = -1;
                break;
            }
            if (idx) {
                const char *ivalue;
                uint32_t ivlen;
                if (kp_hpack_get(t, idx, &name, &nlen, &ivalue, &ivlen) < 0) {
                    rc = -1;
                    break;
                }
                /* copy the name: adding the new entry may evict the one it came from */
                if (nlen > (size_t)(send - sp)) {
                    rc = -1;
                    break;
                }
                memcpy(sp, name, nlen);
                name = sp;
                sp += nlen;
            } else if (kp_hpack_str(&p, end, &sp, send, &name, &nlen) < 0) {
                rc = -1;
                break;
            }
            if (kp_hpack_str(&p, end, &sp, send, &value, &vlen) < 0) {
                rc = -1;
                break;
            }
            if (incremental && kp_hpack_add(t, name, nlen, value, vlen) < 0) {
                rc = -2;
                break;
            }
        }
        if (sink(arg, name, nlen, value, vlen) < 0) {
            rc = -2;
            break;
        }
    }
    free(scratch);
    return rc;
}

/* ---------------------------------------------------------------------------------------------------- */
/* encoding (responses): integers and literal fields without indexing, never Huffman */

/* Writes an integer with an N-bit prefix whose high bits are `first`; returns bytes written (<= 6). */
static size_t kp_hpack_put_int(uint8_t *out, uint8_t first, int prefix, uint64_t v) {
    uint64_t mask = (1u << prefix) - 1;
    if (v < mask) {
        out[0] = (uint8_t)(first | v);
        return 1;
    }
    size_t n = 0;
    out[n++] = (uint8_t)(first | mask);
    v -= mask;
    while (v >= 128) {
        out[n++] = (uint8_t)(0x80 | (v & 0x7f));
        v >>= 7;
    }
    out[n++] = (uint8_t)v;
    return n;
}

/* Literal without indexing, new name (0x00). out needs nlen + vlen + 12 bytes. */
static size_t kp_hpack_put_literal(uint8_t *out, const char *name, size_t nlen, const char *value, size_t vlen) {
    size_t n = 0;
    out[n++] = 0x00;
    n += kp_hpack_put_int(out + n, 0, 7, nlen);
    memcpy(out + n, name, nlen);
    n += nlen;
    n += kp_hpack_put_int(out + n, 0, 7, vlen);
    memcpy(out + n, value, vlen);
    return n + vlen;
}

/* Literal without indexing, name from the static table (0000 + 4-bit index). */
static size_t kp_hpack_put_indexed_name(uint8_t *out, unsigned index, const char *value, size_t vlen) {
    size_t n = kp_hpack_put_int(out, 0x00, 4, index);
    n += kp_hpack_put_int(out + n, 0, 7, vlen);
    memcpy(out + n, value, vlen);
    return n + vlen;
}

#endif /* KP_HPACK_H */

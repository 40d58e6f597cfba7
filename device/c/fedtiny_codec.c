/* fedtiny wire format v1 in C99 (see fedtiny_codec.h). */
#include "fedtiny_codec.h"

#include <math.h>
#include <string.h>

/* ---------- writer ---------- */
typedef struct { uint8_t *p; size_t len, cap; int err; } wbuf;

static void put(wbuf *w, uint8_t b) {
    if (w->len >= w->cap) { w->err = FT_E_SPACE; return; }
    w->p[w->len++] = b;
}
static void put_varint(wbuf *w, uint64_t v) {
    do { uint8_t b = (uint8_t)(v & 0x7F); v >>= 7; put(w, (uint8_t)(b | (v ? 0x80 : 0))); } while (v);
}
static void put_bytes(wbuf *w, const void *src, size_t n) {
    const uint8_t *s = (const uint8_t *)src;
    for (size_t i = 0; i < n; i++) put(w, s[i]);
}
static void put_f32(wbuf *w, float f) {
    uint32_t u; memcpy(&u, &f, 4);
    for (int i = 0; i < 4; i++) put(w, (uint8_t)(u >> (8 * i)));
}
static size_t varint_len(uint64_t v) { size_t n = 1; while (v >>= 7) n++; return n; }

static uint16_t f32_to_f16(float f) {
    uint32_t x; memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, mant = x & 0x7FFFFF;
    int32_t exp = (int32_t)((x >> 23) & 0xFF) - 127 + 15;
    if (exp >= 31) return (uint16_t)(sign | 0x7BFF);             /* saturate to the largest finite */
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        mant |= 0x800000;
        uint32_t shift = (uint32_t)(14 - exp), half = 1u << (shift - 1);
        uint32_t m = mant >> shift, rem = mant & ((1u << shift) - 1);
        if (rem > half || (rem == half && (m & 1))) m++;
        return (uint16_t)(sign | m);
    }
    uint32_t m = mant >> 13, rem = mant & 0x1FFF;
    uint32_t h = sign | ((uint32_t)exp << 10) | m;
    if (rem > 0x1000 || (rem == 0x1000 && (m & 1))) h++;
    return (uint16_t)h;
}
static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, x;
    if (exp == 0) {
        if (mant == 0) x = sign;
        else { exp = 127 - 15 + 1; while (!(mant & 0x400)) { mant <<= 1; exp--; } mant &= 0x3FF; x = sign | (exp << 23) | (mant << 13); }
    } else if (exp == 31) x = sign | 0x7F800000 | (mant << 13);
    else x = sign | ((exp - 15 + 127) << 23) | (mant << 13);
    float f; memcpy(&f, &x, 4); return f;
}

static int rice_k(const ft_tensor *t) {
    if (t->nnz == 0) return 0;
    double sum = (double)t->indices[0];
    for (uint32_t i = 1; i < t->nnz; i++) sum += (double)(t->indices[i] - t->indices[i - 1] - 1);
    double mean = sum / t->nnz;
    if (mean <= 1.0) return 0;
    int k = (int)floor(log2(mean * 0.6931471805599453));
    return k < 0 ? 0 : k;
}
static uint64_t gap(const ft_tensor *t, uint32_t i) { return i ? t->indices[i] - t->indices[i - 1] - 1 : t->indices[0]; }

int ft_encode(const ft_tensor *tensors, uint32_t n, uint8_t *out, size_t cap, size_t *len) {
    wbuf w = {out, 0, cap, FT_OK};
    put_bytes(&w, "FTU", 3);
    put(&w, FT_VERSION);
    put_varint(&w, n);
    for (uint32_t ti = 0; ti < n; ti++) {
        const ft_tensor *t = &tensors[ti];
        uint64_t numel = 1;
        if (t->ndim > FT_MAX_NDIM || t->value_type > FT_TERNARY) return FT_E_FORMAT;
        for (uint8_t d = 0; d < t->ndim; d++) numel *= t->dims[d];
        if (t->nnz > numel) return FT_E_RANGE;
        for (uint32_t i = 0; i < t->nnz; i++)
            if (t->indices[i] >= numel || (i && t->indices[i] <= t->indices[i - 1])) return FT_E_RANGE;
        put_varint(&w, t->tensor_id);
        put(&w, t->ndim);
        for (uint8_t d = 0; d < t->ndim; d++) put_varint(&w, t->dims[d]);
        put_varint(&w, t->nnz);
        put(&w, t->replace ? 1 : 0);
        put(&w, t->value_type);
        int scaled = t->value_type <= FT_INT32 || t->value_type == FT_TERNARY;
        float scale = (t->scale > 0.0f) ? t->scale : 1.0f;
        if (t->value_type == FT_TERNARY) scale = t->scale;
        if (scaled) put_f32(&w, scale);
        if ((uint64_t)t->nnz == numel) {
            put(&w, 0);
        } else {
            size_t vlen = 0;
            for (uint32_t i = 0; i < t->nnz; i++) vlen += varint_len(gap(t, i));
            int k = rice_k(t);
            uint64_t bits = 0;
            for (uint32_t i = 0; i < t->nnz; i++) bits += (gap(t, i) >> k) + 1 + (uint64_t)k;
            size_t rlen = (size_t)((bits + 7) / 8);
            if (rlen < vlen) {
                put(&w, 2); put(&w, (uint8_t)k); put_varint(&w, rlen);
                uint8_t acc = 0; int nb = 0;
                for (uint32_t i = 0; i < t->nnz; i++) {
                    uint64_t g = gap(t, i), q = g >> k;
                    for (uint64_t j = 0; j < q; j++) { acc = (uint8_t)((acc << 1) | 1); if (++nb == 8) { put(&w, acc); acc = 0; nb = 0; } }
                    acc = (uint8_t)(acc << 1); if (++nb == 8) { put(&w, acc); acc = 0; nb = 0; }
                    for (int b = k - 1; b >= 0; b--) { acc = (uint8_t)((acc << 1) | ((g >> b) & 1)); if (++nb == 8) { put(&w, acc); acc = 0; nb = 0; } }
                }
                if (nb) put(&w, (uint8_t)(acc << (8 - nb)));
            } else {
                put(&w, 1); put_varint(&w, vlen);
                for (uint32_t i = 0; i < t->nnz; i++) put_varint(&w, gap(t, i));
            }
        }
        for (uint32_t i = 0; i < t->nnz; i++) {
            float v = t->values[i];
            if (t->value_type == FT_FP32) { put_f32(&w, v); continue; }
            if (t->value_type == FT_FP16) { uint16_t h = f32_to_f16(v); put(&w, (uint8_t)h); put(&w, (uint8_t)(h >> 8)); continue; }
            if (t->value_type == FT_TERNARY) continue;
            double qmax = t->value_type == FT_INT8 ? 127.0 : t->value_type == FT_INT16 ? 32767.0 : 2147483647.0;
            double q = nearbyint((double)v / scale);
            if (q > qmax) q = qmax;
            if (q < -qmax) q = -qmax;
            int64_t qi = (int64_t)q;
            int width = t->value_type == FT_INT8 ? 1 : t->value_type == FT_INT16 ? 2 : 4;
            for (int b = 0; b < width; b++) put(&w, (uint8_t)((uint64_t)qi >> (8 * b)));
        }
        if (t->value_type == FT_TERNARY) {
            uint8_t acc = 0; int nb = 0;
            for (uint32_t i = 0; i < t->nnz; i++) { acc = (uint8_t)((acc << 1) | (t->values[i] < 0)); if (++nb == 8) { put(&w, acc); acc = 0; nb = 0; } }
            if (nb) put(&w, (uint8_t)(acc << (8 - nb)));
        }
    }
    if (w.err) return w.err;
    *len = w.len;
    return FT_OK;
}

/* ---------- reader ---------- */
typedef struct { const uint8_t *p; size_t len, pos; } rbuf;

static int get(rbuf *r, uint8_t *b) { if (r->pos >= r->len) return FT_E_TRUNCATED; *b = r->p[r->pos++]; return FT_OK; }
static int get_varint(rbuf *r, uint64_t *v) {
    uint64_t x = 0; uint8_t b;
    for (int i = 0; i < 10; i++) {
        int e = get(r, &b); if (e) return e;
        x |= (uint64_t)(b & 0x7F) << (7 * i);
        if (!(b & 0x80)) { if (i && b == 0) return FT_E_FORMAT; *v = x; return FT_OK; }
    }
    return FT_E_FORMAT;
}
#define TRY(x) do { int e_ = (x); if (e_) return e_; } while (0)

int ft_decode(const uint8_t *data, size_t len, ft_tensor *tensors, uint32_t max_tensors, uint32_t *n,
              uint32_t *idx_buf, float *val_buf, size_t pool) {
    rbuf r = {data, len, 0};
    uint8_t b; uint64_t v; size_t used = 0;
    if (len < 4) return FT_E_TRUNCATED;
    if (memcmp(data, "FTU", 3) != 0) return FT_E_FORMAT;
    r.pos = 3; TRY(get(&r, &b)); if (b != FT_VERSION) return FT_E_FORMAT;
    TRY(get_varint(&r, &v)); if (v > max_tensors) return FT_E_SPACE;
    *n = (uint32_t)v;
    for (uint32_t ti = 0; ti < *n; ti++) {
        ft_tensor *t = &tensors[ti];
        uint64_t numel = 1;
        TRY(get_varint(&r, &v)); if (v > 0xFFFFFFFFu) return FT_E_RANGE; t->tensor_id = (uint32_t)v;
        for (uint32_t j = 0; j < ti; j++) if (tensors[j].tensor_id == t->tensor_id) return FT_E_FORMAT;
        TRY(get(&r, &t->ndim)); if (t->ndim > FT_MAX_NDIM) return FT_E_RANGE;
        for (uint8_t d = 0; d < t->ndim; d++) {
            TRY(get_varint(&r, &v)); if (v > (1u << 28)) return FT_E_RANGE;
            t->dims[d] = (uint32_t)v; numel *= v; if (numel > (1u << 28)) return FT_E_RANGE;
        }
        TRY(get_varint(&r, &v)); if (v > numel) return FT_E_RANGE; t->nnz = (uint32_t)v;
        if (used + t->nnz > pool) return FT_E_SPACE;
        t->indices = idx_buf + used; t->values = val_buf + used; used += t->nnz;
        TRY(get(&r, &b)); if (b & ~1u) return FT_E_FORMAT; t->replace = b;
        TRY(get(&r, &t->value_type)); if (t->value_type > FT_TERNARY) return FT_E_FORMAT;
        t->scale = 1.0f;
        if (t->value_type <= FT_INT32 || t->value_type == FT_TERNARY) {
            if (r.pos + 4 > r.len) return FT_E_TRUNCATED;
            uint32_t u = (uint32_t)data[r.pos] | (uint32_t)data[r.pos + 1] << 8 | (uint32_t)data[r.pos + 2] << 16 | (uint32_t)data[r.pos + 3] << 24;
            r.pos += 4; memcpy(&t->scale, &u, 4);
            if (!isfinite(t->scale) || t->scale < 0) return FT_E_VALUE;
        }
        uint8_t coding; TRY(get(&r, &coding));
        if (coding == 0) {
            if (t->nnz != numel) return FT_E_RANGE;
            for (uint32_t i = 0; i < t->nnz; i++) t->indices[i] = i;
        } else if (coding == 1 || coding == 2) {
            uint8_t k = 0;
            if (coding == 2) { TRY(get(&r, &k)); if (k > 40) return FT_E_FORMAT; }
            TRY(get_varint(&r, &v)); if (v > r.len - r.pos) return FT_E_TRUNCATED;
            size_t end = r.pos + (size_t)v;
            uint64_t pos = 0;
            if (coding == 1) {
                rbuf s = {data, end, r.pos};
                for (uint32_t i = 0; i < t->nnz; i++) {
                    uint64_t g; TRY(get_varint(&s, &g));
                    pos += g + (i ? 1 : 0);
                    if (pos >= numel) return FT_E_RANGE;
                    t->indices[i] = (uint32_t)pos;
                }
                if (s.pos != end) return FT_E_FORMAT;
            } else {
                size_t bit = r.pos * 8, endbit = end * 8;
                for (uint32_t i = 0; i < t->nnz; i++) {
                    uint64_t q = 0, rem = 0;
                    for (;;) {
                        if (bit >= endbit) return FT_E_TRUNCATED;
                        int one = (data[bit >> 3] >> (7 - (bit & 7))) & 1; bit++;
                        if (!one) break;
                        if (++q > numel) return FT_E_RANGE;
                    }
                    for (uint8_t j = 0; j < k; j++) {
                        if (bit >= endbit) return FT_E_TRUNCATED;
                        rem = (rem << 1) | ((data[bit >> 3] >> (7 - (bit & 7))) & 1); bit++;
                    }
                    uint64_t g = (q << k) | rem;
                    pos += g + (i ? 1 : 0);
                    if (pos >= numel) return FT_E_RANGE;
                    t->indices[i] = (uint32_t)pos;
                }
                if (endbit - bit >= 8) return FT_E_FORMAT;
                for (; bit < endbit; bit++) if ((data[bit >> 3] >> (7 - (bit & 7))) & 1) return FT_E_FORMAT;
            }
            r.pos = end;
        } else {
            return FT_E_FORMAT;
        }
        if (t->value_type == FT_TERNARY) {
            size_t nbytes = (t->nnz + 7) / 8;
            if (r.pos + nbytes > r.len) return FT_E_TRUNCATED;
            for (uint32_t i = 0; i < t->nnz; i++) {
                int neg = (data[r.pos + i / 8] >> (7 - i % 8)) & 1;
                t->values[i] = neg ? -t->scale : t->scale;
            }
            r.pos += nbytes;
        } else {
            int width = t->value_type == FT_INT8 ? 1 : t->value_type == FT_INT16 ? 2 : t->value_type == FT_FP16 ? 2 : 4;
            if (r.pos + (size_t)width * t->nnz > r.len) return FT_E_TRUNCATED;
            for (uint32_t i = 0; i < t->nnz; i++) {
                const uint8_t *q = data + r.pos + (size_t)width * i;
                float f;
                if (t->value_type == FT_INT8) f = (float)(int8_t)q[0] * t->scale;
                else if (t->value_type == FT_INT16) f = (float)(int16_t)(q[0] | q[1] << 8) * t->scale;
                else if (t->value_type == FT_INT32) f = (float)((double)(int32_t)((uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 | (uint32_t)q[3] << 24) * t->scale);
                else if (t->value_type == FT_FP16) f = f16_to_f32((uint16_t)(q[0] | q[1] << 8));
                else { uint32_t u = (uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 | (uint32_t)q[3] << 24; memcpy(&f, &u, 4); }
                if (!isfinite(f)) return FT_E_VALUE;
                t->values[i] = f;
            }
            r.pos += (size_t)width * t->nnz;
        }
    }
    if (r.pos != r.len) return FT_E_FORMAT;
    return FT_OK;
}

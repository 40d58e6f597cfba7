/* fedtiny wire format v1: a dependency-free C99 encoder and decoder for MCU firmware.
 * The format is specified in docs/compression.md; the Python reference is fedtiny/compress/codec.py.
 * No dynamic allocation: the caller provides every buffer. All functions return FT_OK or a negative error. */
#ifndef FEDTINY_CODEC_H
#define FEDTINY_CODEC_H

#include <stddef.h>
#include <stdint.h>

#define FT_VERSION 1
#define FT_MAX_NDIM 8

enum ft_status {
    FT_OK = 0,
    FT_E_TRUNCATED = -1,   /* input ends early */
    FT_E_FORMAT = -2,      /* bad magic, version, flag, type or coding */
    FT_E_RANGE = -3,       /* position, count or shape out of range */
    FT_E_SPACE = -4,       /* caller's buffer too small */
    FT_E_VALUE = -5        /* non-finite value or scale */
};

enum ft_value_type { FT_INT8 = 0, FT_INT16 = 1, FT_INT32 = 2, FT_FP16 = 3, FT_FP32 = 4, FT_TERNARY = 5 };

typedef struct {
    uint32_t tensor_id;
    uint8_t ndim;
    uint32_t dims[FT_MAX_NDIM];
    uint32_t nnz;
    uint8_t replace;        /* values replace instead of add */
    uint8_t value_type;     /* enum ft_value_type */
    float scale;            /* int and ternary types */
    uint32_t *indices;      /* nnz sorted flat positions */
    float *values;          /* nnz dequantized values (value = q * scale) */
} ft_tensor;

/* Encode n tensors into out (capacity cap); *len receives the byte count. */
int ft_encode(const ft_tensor *tensors, uint32_t n, uint8_t *out, size_t cap, size_t *len);

/* Decode data into at most max_tensors tensors, storing positions and values in the caller's
 * idx_buf / val_buf (capacity pool entries, shared by all tensors). *n receives the tensor count. */
int ft_decode(const uint8_t *data, size_t len, ft_tensor *tensors, uint32_t max_tensors, uint32_t *n,
              uint32_t *idx_buf, float *val_buf, size_t pool);

#endif

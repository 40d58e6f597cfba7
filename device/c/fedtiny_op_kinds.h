/* The C step's op kinds, written from fedtiny/int8/ops/base.py's CKind by `make op-kinds`: edit them
   there (tests/test_c_step.py holds this file equal to it). */
#ifndef FEDTINY_OP_KINDS_H
#define FEDTINY_OP_KINDS_H

enum ft_op_kind {
    FT_OP_CONV = 0,
    FT_OP_ADD = 1,
    FT_OP_POOL = 2,
    FT_OP_MAXPOOL = 3,
    FT_OP_MEAN = 4,
    FT_OP_MUL = 5,
    FT_OP_CONCAT = 6,
    FT_OP_LOOKUP = 7,
    FT_OP_SLICE = 8,
    FT_OP_RESIZE = 9
};

#endif

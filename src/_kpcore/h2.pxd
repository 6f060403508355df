# C declarations of the gRPC transport (include/kp_h2.h, include/kp_hpack.h) for Cython.
from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef extern from "kp_h2.h" nogil:
    enum:
        KP_H2_CALL
        KP_H2_START
        KP_H2_MSG
        KP_H2_HALF_CLOSE
        KP_H2_CANCEL
        KP_H2_Q_CALLS
        KP_H2_Q_EVENTS
        KP_H2_ENC_GZIP
        KP_H2_ENC_DEFLATE

    ctypedef struct kp_h2_item:
        int kind
        int method
        uint64_t call_id
        double deadline
        char *meta
        uint32_t meta_len
        uint8_t *data
        uint32_t len
        int compressed

    ctypedef struct kp_h2_server:
        int port
        uint64_t calls_total
        uint64_t cancels_total
        uint64_t conns_total
        uint64_t protocol_errors
        uint64_t rejected_total

    kp_h2_server *kp_h2_create(const char *host, int port, int nmethods, const char *const *paths,
                               const uint32_t *path_lens, const uint8_t *streaming, uint64_t max_msg,
                               uint32_t max_header_list, uint32_t max_streams, int max_conns, int *err)
    int kp_h2_start(kp_h2_server *s)
    void kp_h2_shutdown(kp_h2_server *s)
    void kp_h2_stop(kp_h2_server *s)
    void kp_h2_free(kp_h2_server *s)
    kp_h2_item *kp_h2_next(kp_h2_server *s, int q)
    kp_h2_item *kp_h2_try_next(kp_h2_server *s, int q)
    void kp_h2_item_free(kp_h2_item *it)
    int kp_h2_respond(kp_h2_server *s, uint64_t call_id, const uint8_t *data, size_t len, int has_data,
                      int status, const char *msg, size_t mlen)
    int kp_h2_send(kp_h2_server *s, uint64_t call_id, const uint8_t *data, size_t len, size_t *backlog)
    long long kp_h2_backlog(kp_h2_server *s, uint64_t call_id)
    void kp_h2_consumed(kp_h2_server *s, uint64_t call_id, uint32_t n)
    int kp_h2_active(kp_h2_server *s, uint64_t call_id)
    void kp_h2_peer(kp_h2_server *s, uint64_t call_id, char *out, size_t cap)
    void kp_h2_set_infer_method(kp_h2_server *s, int method)
    int kp_h2_set_admission(kp_h2_server *s, const char *name, uint32_t nlen, void *db)


cdef extern from "kp_hpack.h" nogil:
    ctypedef struct kp_hpack_table:
        pass
    ctypedef int (*kp_hpack_sink)(void *arg, const char *name, uint32_t nlen, const char *value, uint32_t vlen)
    int kp_huff_init()
    long kp_huff_decode(const uint8_t *inp, size_t n, uint8_t *out, size_t cap)
    void kp_hpack_table_init(kp_hpack_table *t)
    void kp_hpack_table_free(kp_hpack_table *t)
    int kp_hpack_decode(kp_hpack_table *t, const uint8_t *p, size_t n, kp_hpack_sink sink, void *arg)


cdef class H2Server:
    cdef kp_h2_server *s
    cdef object _methods
    cdef object _admit

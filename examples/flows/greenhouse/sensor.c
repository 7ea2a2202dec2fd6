/*
 * greenhouse/sensor: every tick, "reads" a temperature (simulated from the clock),
 * publishes it to telemetry/temperature (granted by the bundle's permissions) and
 * stores it as "last_temp" in the flow's storage, which the alarm module reads.
 */
#include <stdio.h>
#include <stdlib.h>

#include "edge.h"

EDGE_EXPORT("edge_alloc") void *edge_alloc(int32_t size) { return malloc((size_t)size); }
EDGE_EXPORT("edge_free") void edge_free(void *ptr, int32_t size) { (void)size; free(ptr); }

EDGE_EXPORT("edge_on_event")
int32_t edge_on_event(int32_t kind, const char *name, int32_t name_len, const char *payload,
                      int32_t payload_len) {
    (void)name; (void)name_len; (void)payload; (void)payload_len;
    if (kind != EDGE_EVENT_INTERVAL) return EDGE_OK;
    int64_t seconds = edge_time_ms() / 1000;
    int temp = 18 + (int)(seconds % 12);  /* 18..29 degrees */
    char buf[64];
    int n = snprintf(buf, sizeof buf, "%d", temp);
    edge_kv_set("last_temp", 9, buf, n);
    snprintf(buf, sizeof buf, "{\"temperature\": %d}", temp);
    return edge_publish_str("telemetry/temperature", buf, 1);
}

/* Prints the ABI as plugvisor.h lays it out, one "key value" per line, for
 * the plugin-sdk unit test that compares it with the Rust definitions. */
#include <stdio.h>
#include <string.h>

#include "plugvisor.h"

#define FIELD(type, field) \
    printf(#type "." #field " %zu %zu\n", offsetof(type, field), sizeof(((type *)0)->field))

int main(void) {
    printf("abi_version %u\n", PLUGVISOR_ABI_VERSION);
    printf("symbol %s\n", PLUGVISOR_DESCRIPTOR_SYMBOL);
    printf("status.ok %d\n", PV_OK);
    printf("status.error %d\n", PV_ERROR);
    printf("status.panic %d\n", PV_PANIC);
    printf("status.unsupported %d\n", PV_UNSUPPORTED);
    printf("sizeof.PvStr %zu\n", sizeof(PvStr));
    printf("sizeof.PvBuf %zu\n", sizeof(PvBuf));
    printf("sizeof.PvPluginDescriptor %zu\n", sizeof(PvPluginDescriptor));
    FIELD(PvStr, ptr);
    FIELD(PvStr, len);
    FIELD(PvBuf, ptr);
    FIELD(PvBuf, len);
    FIELD(PvBuf, cap);
    FIELD(PvPluginDescriptor, abi_version);
    FIELD(PvPluginDescriptor, descriptor_size);
    FIELD(PvPluginDescriptor, name);
    FIELD(PvPluginDescriptor, version);
    FIELD(PvPluginDescriptor, init);
    FIELD(PvPluginDescriptor, handle);
    FIELD(PvPluginDescriptor, health);
    FIELD(PvPluginDescriptor, degrade);
    FIELD(PvPluginDescriptor, shutdown);
    FIELD(PvPluginDescriptor, free);
    return 0;
}

#include "iopf_client.h"

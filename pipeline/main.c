/* mergestream's command line: placeholder until the CLI lands. */
#include <stdio.h>
int main(void) { puts("mergestream"); return 0; }

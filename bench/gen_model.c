/* placeholder: the model generator lands with the writer */
int main(void) { return 0; }

package dev.tidemark.it;

import java.io.IOException;

import org.apache.kafka.connect.cli.ConnectStandalone;

/**
 * Kafka Connect's own {@code ConnectStandalone}, tied to the test that started
 * it: when its standard input closes (the test stopped it, or the test process
 * died, even by SIGKILL), the JVM halts, so no worker outlives its test.
 */
public final class Worker {
    private Worker() {
    }

    public static void main(String[] args) {
        Thread watchdog = new Thread(() -> {
            try {
                while (System.in.read() != -1) {
                    // Input is not expected; only its end counts.
                }
            } catch (IOException e) {
                // A broken pipe is an end too.
            }
            Runtime.getRuntime().halt(0);
        }, "tidemark-parent-watchdog");
        watchdog.setDaemon(true);
        watchdog.start();
        ConnectStandalone.main(args);
    }
}
